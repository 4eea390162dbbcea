"""Smoke tests of `minigpt bench`: tiny shapes, two steps. They check that the CSV, markdown
and PNG are written with the expected columns, that the numbers are positive and finite, that
the variants train the same model (equal first-step losses), and that bad options fail with a
clear message. (The torch.compile variant takes about a minute to compile on this CPU even
for the tiny model, so it is exercised by the committed CPU results, not here.)"""
import argparse
import ast
import csv
import functools
import glob
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from minigpt import bench
from minigpt.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_csv(path):
    with open(path, newline="") as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines))


def _header_lines(path):
    with open(path) as f:
        return [line for line in f if line.startswith("#")]


def _png_ok(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_train_writes_results(tmp_path):
    res = bench.bench_train("tiny", steps=2, device="cpu", variants="minigpt,eager",
                            out=str(tmp_path), profile=True)
    paths = res["paths"]
    for key in ("csv", "md", "png", "profile"):
        assert key in paths, key
    rows = _read_csv(paths["csv"])
    assert [r["variant"] for r in rows] == ["minigpt", "eager"]
    assert list(rows[0]) == bench.TRAIN_COLUMNS
    # CPU peak memory needs /proc/self/clear_refs (Linux); elsewhere the column stays empty
    mem_cols = ("peak MB", "mem x eager") if os.access("/proc/self/clear_refs", os.W_OK) else ()
    for r in rows:
        for col in ("step ms", "tokens/s", "x eager", "TFLOP/s", "MFU %", "first step s",
                    "params M") + mem_cols:
            v = float(r[col])
            assert math.isfinite(v) and v > 0, (col, r[col])
        assert r["config"] == "tiny" and r["batch"] == "2" and r["seq"] == "32"
    assert float(rows[1]["x eager"]) == pytest.approx(1.0)
    # same initial weights and batch: the first step's loss agrees across backends
    l0, l1 = float(rows[0]["loss@1"]), float(rows[1]["loss@1"])
    assert l0 == pytest.approx(l1, rel=1e-4)
    assert abs(l0 - math.log(65)) < 0.5  # near-uniform prediction at init over 65 symbols
    assert rows[0]["backend"] == "cpu" and rows[1]["backend"] == "torch"
    hdr = "".join(_header_lines(paths["csv"]))
    for key in ("# device:", "# date:", "# torch:", "# triton:", "# load note:",
                "# peak TFLOP/s:"):
        assert key in hdr
    md = open(paths["md"]).read()
    assert "| config | variant | backend |" in md and "Goals:" in md
    assert "tiny: minigpt" in md
    assert _png_ok(paths["png"])
    prof = open(paths["profile"]).read()
    assert "## tiny: minigpt" in prof and "## tiny: eager" in prof and "Self CPU" in prof
    assert "| category | ms | % | calls |" in prof and "| GEMM |" in prof
    assert "| layer/rms norm |" in prof and "| attention |" in prof
    assert "| shapes (to, from) | calls | ms |" in prof
    assert paths["csv"].endswith("bench_train_cpu.csv")


def test_train_models_stay_identical_between_variants():
    """After the same steps, eager and our kernels hold (nearly) the same weights: the
    benchmark compares equal work."""
    shape = bench.TRAIN_CONFIGS["tiny"][0]
    from minigpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    base = GPT(GPTConfig(**shape))
    xy = torch.randint(0, 65, (1, 2, 33))  # one micro-batch of 2 sequences a step
    batches = [(xy[..., :-1], xy[..., 1:].contiguous())]
    import copy

    runs = [bench._TrainVariant(v, copy.deepcopy(base), torch.device("cpu"), None, batches)
            for v in ("minigpt", "eager")]
    for _ in range(2):
        for r in runs:
            r.step()
    for (n, a), (_, b) in zip(runs[0].raw.named_parameters(), runs[1].raw.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    assert runs[0].state_bytes() == runs[1].state_bytes() > 3 * 4 * base.num_params(False) - 1


def test_train_grad_accum_is_one_big_batch(tmp_path):
    """--grad-accum: K micro-batches a step take the same optimizer step as one batch of all
    their sequences (the mean loss's gradient either way)."""
    import copy

    from minigpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    base = GPT(GPTConfig(**bench.TRAIN_CONFIGS["tiny"][0]))
    xy = torch.randint(0, 65, (4, 33))
    whole = [(xy[None, :, :-1], xy[None, :, 1:].contiguous())]
    split = [(xy.view(2, 2, 33)[..., :-1], xy.view(2, 2, 33)[..., 1:].contiguous())]
    a, b = (bench._TrainVariant("minigpt", copy.deepcopy(base), torch.device("cpu"), None, bs)
            for bs in (whole, split))
    la, lb = a.step(), b.step()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(a.raw.named_parameters(), b.raw.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    res = bench.bench_train("tiny", steps=1, device="cpu", variants="minigpt", grad_accum=3,
                            plot=False, out=str(tmp_path), profile=False)
    row = res["rows"][0]
    assert row["accum"] == 3
    assert row["tokens/s"] == pytest.approx(3 * row["batch"] * row["seq"] / row["step ms"] * 1e3)


def test_flops_per_token_matches_nanogpt_formula():
    from minigpt.model import GPT, GPTConfig

    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=11)
    m = GPT(cfg)
    n = sum(p.numel() for p in m.parameters()) - m.transformer.wpe.weight.numel()
    assert bench.flops_per_token(m, 8) == 6 * n + 12 * 3 * 2 * 8 * 8


def test_decode_gpt_writes_results(tmp_path):
    # 15 decode steps against one prefill: enough that noise cannot hide the decode time
    # (with 3 steps and one round it did now and then on a busy 2-core machine)
    res = bench.bench_decode("gpt", config="tiny", batches=[1, 2], prompt_len=4,
                             new_tokens=16, reps=3, device="cpu", out=str(tmp_path))
    rows = _read_csv(res["paths"]["csv"])
    assert list(rows[0]) == [c for c in bench.DECODE_COLUMNS if c != "note"]  # none unmeasured
    assert [(r["impl"], r["batch"]) for r in rows] == [("minigpt", "1"), ("eager", "1"),
                                                        ("minigpt", "2"), ("eager", "2")]
    for r in rows:
        for col in ("prefill tok/s", "decode tok/s", "ms/step", "GB/s", "x base"):
            v = float(r[col])
            assert math.isfinite(v) and v > 0, (col, r[col])
        assert r["same tokens"] == "True"  # fp32 greedy: our kernels pick the same tokens
    assert _png_ok(res["paths"]["png"])
    assert res["paths"]["csv"].endswith("bench_decode_gpt-tiny_cpu.csv")


def test_decode_time_is_taken_round_by_round():
    """Decode = each round's whole run less that round's first token, then the median: here
    the two medians alone (5 ms first, 3 ms all) would give a negative decode time."""
    stats = {"x first": {"median": 5.0, "samples": [1.0, 5.0, 5.0]},
             "x all": {"median": 3.0, "samples": [2.0, 3.0, 6.0]}}
    assert bench.decode_split(stats, "x") == (5.0, 1.0)
    stats["x all"]["samples"] = [1.0, 5.0, 4.5]  # round by round too: 0, 0, -0.5
    assert bench.decode_split(stats, "x") == (5.0, None)


def test_decode_not_measured_is_blank_not_absurd(tmp_path, monkeypatch):
    """A decode lost in the noise leaves its row's decode numbers blank with a note (it had
    been clamped to 1e-6 ms: billions of tokens/s); the other rows keep theirs."""
    H = bench.harness()
    real = H.time_fns_stats

    def eager_all_as_fast_as_first(fns, *a, **k):
        st = real(fns, *a, **k)
        st["eager all"] = dict(st["eager first"])
        return st

    monkeypatch.setattr(H, "time_fns_stats", eager_all_as_fast_as_first)
    res = bench.bench_decode("gpt", config="tiny", batches=[1], prompt_len=4, new_tokens=12,
                             reps=3, device="cpu", out=str(tmp_path))
    rows = {r["impl"]: r for r in _read_csv(res["paths"]["csv"])}
    for col in ("decode tok/s", "ms/step", "GB/s", "x base"):
        assert rows["eager"].get(col, "") == "", col  # a column no row filled is left out
    assert "decode not measured" in rows["eager"]["note"]
    assert rows["minigpt"]["note"] == "x base blank: the baseline's (eager) decode was not measured"
    assert float(rows["minigpt"]["decode tok/s"]) > 0 and "x base" not in rows["minigpt"]
    assert float(rows["eager"]["prefill tok/s"]) > 0
    assert _png_ok(res["paths"]["png"])


def test_generate_prompts_repeat_the_text():
    """bench_generate.py's prompts: as long as asked, TEXT repeated as needed (four copies,
    ~217 SmolLM2 tokens, had failed --prompt-len 256 with a bare assert after the model
    loaded), each row 3 tokens further into the text than the one before."""
    gen = bench._load_script("bench_generate")

    class Words:  # a token a word: ~45 tokens a copy of TEXT
        def encode(self, text):
            return [len(w) for w in text.split()]

    x = gen.prompts(Words(), 8, 300)
    assert x.shape == (8, 300)
    assert torch.equal(x[1:, :-3], x[:-1, 3:])


@pytest.mark.parametrize("script, argv, match", [
    ("bench_generate", ["--new-tokens", "1"], "--new-tokens must be >= 2"),
    ("bench_generate", ["--prompt-len", "0"], "--prompt-len must be a positive integer"),
    ("bench_generate", ["--device", "tpu"], "--device must be"),
    ("bench_loss", ["--ops", "ce,bogus"], "--ops: unknown ['bogus']"),
    ("bench_loss", ["--ops", ","], "--ops: nothing given"),
    ("bench_attention", ["--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
    ("bench_quant_matmul", ["--m", "abc"], "argument --m: comma-separated positive integers"),
    ("bench_quant_matmul", ["--rounds", "0"], "argument --rounds: a positive integer"),
    ("bench_training_ops", ["--device", "tpu"],
     "argument --device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    *[(s, ["--device", dev], f"argument --device: {dev}: CUDA is not available on this machine")
      for s in ("bench_attention", "bench_training_ops", "bench_loss", "bench_ops")
      for dev in ("cuda", "cuda:1") if not torch.cuda.is_available()],
    *[(s, ["--device", "cuda:99"], "argument --device: cuda:99: torch sees ")
      for s in ("bench_attention", "bench_training_ops", "bench_loss", "bench_ops")
      if torch.cuda.is_available()],
    ("bench_generate", ["--device", "cuda:99"], "--device cuda:99: "),
])
def test_bench_scripts_refuse_bad_options(script, argv, match, monkeypatch, capsys, tmp_path):
    """A bad option is a usage error before anything loads or runs, not a traceback after."""
    mod = bench._load_script(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert e.value.code == 2
    assert match in capsys.readouterr().err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("path", [
    p for p in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
                      + glob.glob(os.path.join(ROOT, "scripts", "*.py")))
    if "description=__doc__" in open(p).read()], ids=os.path.basename)
def test_script_help_descriptions_are_whole_sentences(path):
    """A script's --help description taken from its docstring is a whole paragraph, not its
    first line cut mid-sentence."""
    src = open(path).read()
    m = re.search(r"description=(__doc__\.split\([^)]*\)\[\d+\])", src)
    assert m, "a description from __doc__ in another form: extend this test"
    text = eval(m.group(1), {"__doc__": ast.get_docstring(ast.parse(src), clean=False)})
    assert text.rstrip().endswith("."), text


def test_decode_bytes_per_step():
    from minigpt.model import GPT, GPTConfig

    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=16, vocab_size=5)
    m = GPT(cfg)
    weights = 4 * sum(p.numel() for p in m.parameters())  # tied head counted once
    kv_per_pos = 2 * 2 * 3 * 2 * 4 * 4                       # k+v, layers, batch, heads, dim, fp32
    got = bench.decode_bytes_per_step(m, batch=3, prompt=6, new=4, cache_dtype=torch.float32)
    assert got == weights + kv_per_pos * (6 + 2)


def test_ops_merges_results(tmp_path):
    H = bench.harness()
    dev = torch.device("cpu")
    src = tmp_path / "in"
    rows_a = [H.row(op="softmax", shape=(4, 8), dtype=torch.float32, backend=be, pass_="fwd",
                    ms=ms, nbytes=256, eager_ms=2.0) for be, ms in (("eager", 2.0), ("cpu", 0.5))]
    H.write_results(rows_a, "ops", dev, str(src))
    rows_b = [dict(op="rms_norm", shape="8x8", dtype="fp32", backend=be, **{"pass": "fwd+bwd"},
                   ms=ms, **{"x eager": 3.0 / ms, "MB": 1.5}) for be, ms in (("eager", 3.0),
                                                                           ("cpu", 1.0))]
    H.write_results(rows_b, "training_ops", dev, str(src))
    # attention reports "x sdpa"; "x eager" is derived from its eager row; its kernel time
    # (a GPU run's profiler column) is carried over as is
    rows_c = [dict(op="attention", shape="1x2x7x8", dtype="fp32", backend=be, **{"pass": "fwd"},
                   ms=ms, **{"x sdpa": 1.0 / ms, "kernel ms": ms / 2})
              for be, ms in (("sdpa", 1.0), ("eager", 4.0), ("cpu", 0.8))]
    H.write_results(rows_c, "attention", dev, str(src))
    res = bench.bench_ops(device="cpu", results=str(src), out=str(tmp_path / "out"))
    rows = _read_csv(res["paths"]["csv"])
    # columns no source filled in (TFLOP/s here) are left out
    assert list(rows[0]) == [c for c in bench.OPS_COLUMNS if c != "TFLOP/s"]
    assert [(r["source"], r["op"], r["backend"]) for r in rows] == [
        ("bench_ops", "softmax", "eager"), ("bench_ops", "softmax", "cpu"),
        ("bench_attention", "attention", "sdpa"), ("bench_attention", "attention", "eager"),
        ("bench_attention", "attention", "cpu"),
        ("bench_training_ops", "rms_norm", "eager"), ("bench_training_ops", "rms_norm", "cpu")]
    assert float(rows[4]["x eager"]) == pytest.approx(5.0)
    assert float(rows[4]["x sdpa"]) == pytest.approx(1.25)
    assert float(rows[4]["kernel ms"]) == pytest.approx(0.4)
    assert rows[0]["kernel ms"] == ""  # a source without the column leaves it blank
    rows = rows[:2] + rows[5:]
    assert float(rows[1]["x eager"]) == pytest.approx(4.0)
    assert float(rows[3]["x eager"]) == pytest.approx(3.0)
    assert float(rows[3]["MB"]) == pytest.approx(1.5)
    assert float(rows[1]["GB/s"]) == pytest.approx(256 / 0.5e-3 / 1e9)
    assert any("loss_cpu.csv" in m for m in res["missing"])
    assert _png_ok(res["paths"]["png"])
    md = open(res["paths"]["md"]).read()
    assert "Missing:" in md and "| source | date | op |" in md


def test_ops_merges_another_devices_results(tmp_path):
    """--tag: a GPU session's CSVs merged here, on a machine without that GPU. The merged
    files carry the tag and the sources' device and versions, and "kernel x eager" (the GPU's
    kernel times) is derived beside the per-call "x eager"."""
    H = bench.harness()
    cpu = torch.device("cpu")
    src = tmp_path / "in"
    hdr = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-26 09:06 UTC",
           "torch": "2.11.0+cu130", "triton": "3.6.0", "python": "3.12.3", "cuda": "13.0",
           "threads": "16"}
    rows = [dict(op="softmax", shape="16384x8192", dtype="bf16", backend=be, **{"pass": "fwd"},
                 ms=ms, **{"x eager": 0.2 / ms, "kernel ms": k})
            for be, ms, k in (("eager", 0.2, 0.15), ("triton", 0.25, 0.1))]
    H.write_results(rows, "ops", cpu, str(src), header=hdr, tag="cuda-h100")
    res = bench.bench_ops(results=str(src), out=str(tmp_path / "out"), tag="cuda-h100",
                          sources="bench_ops")
    assert res["paths"]["csv"].endswith("bench_ops_cuda-h100.csv")
    text = open(res["paths"]["csv"]).read()
    assert "# device: NVIDIA H100 80GB HBM3" in text and "# torch: 2.11.0+cu130" in text
    assert "threads" not in text  # this machine's facts are not the results' machine's
    got = _read_csv(res["paths"]["csv"])
    assert float(got[1]["x eager"]) == pytest.approx(0.8)
    assert float(got[1]["kernel x eager"]) == pytest.approx(1.5)
    assert _png_ok(res["paths"]["png"])
    with pytest.raises(ValueError, match="--tag"):
        bench.bench_ops(run=True, tag="cuda-h100", results=str(src), out=str(tmp_path))
    with pytest.raises(ValueError, match="--tag"):
        bench.bench_ops(tag="../x", results=str(src), out=str(tmp_path))


def test_ops_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no per-op results"):
        bench.bench_ops(device="cpu", results=str(tmp_path), out=str(tmp_path))


@pytest.mark.parametrize("kwargs, match", [
    (dict(configs="nope"), "--config: unknown"),
    (dict(configs=""), "--config: nothing given"),
    (dict(variants="minigpt,fast"), "--variants: unknown"),
    (dict(steps=0), "--steps must be a positive integer"),
    (dict(batch_size=-1), "--batch-size must be a positive integer"),
    (dict(device="tpu"), "--device must be"),
    (dict(dtype="float8"), "--dtype must be"),
    (dict(dtype="float16", device="cpu"), "float16 needs a GPU"),
    (dict(peak_tflops=-1.0), "--peak-tflops must be a positive"),
])
def test_train_bad_options(kwargs, match, tmp_path):
    kw = dict(configs="tiny", steps=1, out=str(tmp_path))
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        bench.bench_train(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench.bench_train("tiny", steps=1, device="cuda", out=str(tmp_path))


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="bert"), "--model must be gpt or smollm2"),
    (dict(config="huge"), "--config: unknown"),
    (dict(new_tokens=1), "--new-tokens must be >= 2"),
    (dict(batches=[0]), "--batch must be a positive integer"),
    (dict(prompt_len=250, new_tokens=10, config="seed"), "exceed the seed context"),
])
def test_decode_bad_options(kwargs, match, tmp_path):
    kw = dict(model="gpt", config="tiny", device="cpu", out=str(tmp_path))
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        bench.bench_decode(**kw)


def test_cpu_skips_shapes_too_big_for_the_budget(tmp_path, capsys):
    res = bench.bench_train("gpt2", steps=5, device="cpu", out=str(tmp_path),
                            max_cpu_seconds=1.0)
    assert res["rows"] == [] and len(res["skipped"]) == 1
    assert "gpt2: skipped on this CPU" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "train", "--config", "nope", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "minigpt bench: error: --config: unknown ['nope']" in err
    assert main(["bench", "train", "--steps", "0", "--out", str(tmp_path)]) == 1
    assert "--steps must be a positive integer" in capsys.readouterr().err
    assert main(["bench", "decode", "--threads", "0", "--out", str(tmp_path)]) == 1
    assert "--threads must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown sub-choice
        main(["bench", "fly"])
    assert "invalid choice" in capsys.readouterr().err


def test_train_without_eager_names_its_baseline(tmp_path):
    """Without eager in --variants the ratios are to the first variant, and the columns say so
    ("x eager" there had been a ratio to minigpt)."""
    res = bench.bench_train("tiny", steps=1, device="cpu", variants="minigpt",
                            out=str(tmp_path), profile=False)
    rows = _read_csv(res["paths"]["csv"])
    assert float(rows[0]["x minigpt"]) == 1.0 and not any("eager" in c for c in rows[0])
    md = open(res["paths"]["md"]).read()
    assert "| x minigpt |" in md and "tiny: x minigpt" in md
    assert _png_ok(res["paths"]["png"])


def test_cli_train_tiny(tmp_path, capsys):
    threads = torch.get_num_threads()
    rc = main(["bench", "train", "--config", "tiny", "--steps", "1", "--variants", "eager",
               "--out", str(tmp_path), "--no-plot", "--no-profile", "--threads", "1"])
    assert torch.get_num_threads() == threads  # restored
    assert "# threads: 1" in "".join(_header_lines(tmp_path / "bench_train_cpu.csv"))
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote csv:" in out and "wrote png" not in out
    rows = _read_csv(tmp_path / "bench_train_cpu.csv")
    assert [r["variant"] for r in rows] == ["eager"] and float(rows[0]["x eager"]) == 1.0


def test_cpu_peak_estimate():
    tf, how = bench.cpu_peak_tflops(threads=2)
    if tf is None:
        assert "--peak-tflops" in how
    else:
        assert 0.001 < tf < 100 and "GFLOP/s" in how
    assert bench.device_peak_tflops(torch.device("cpu"), "fp32", 1.5) == (1.5, "--peak-tflops 1.5")


def test_missing_checkout_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match="needs the MiniGPT source checkout"):
        bench._load_script("bench_generate")


def test_ops_run_invokes_each_script_quick(monkeypatch, tmp_path):
    """--run starts each per-op script with its short setting, the device and the results
    folder, then merges what they wrote."""
    bench.harness()  # the real shared harness, loaded before BENCH_DIR moves
    scripts = tmp_path / "benchmarks"
    scripts.mkdir()
    (scripts / "bench_ops.py").write_text(
        "import sys, os\n"
        "a = sys.argv[1:]\n"
        "assert a[:3] == ['--quick', '--device', 'cpu'] and a[3] == '--out', a\n"
        "with open(os.path.join(a[4], 'ops_cpu.csv'), 'w') as f:\n"
        "    f.write('# date: now\\nop,shape,dtype,backend,pass,ms,x eager\\n'\n"
        "            'softmax,7x1025,fp32,cpu,fwd,0.25,3.5\\n')\n")
    monkeypatch.setattr(bench, "BENCH_DIR", scripts)
    res = bench.bench_ops(run=True, device="cpu", results=str(tmp_path / "res"),
                          out=str(tmp_path / "out"), sources="bench_ops", plot=False)
    assert res["ran"] == ["bench_ops: exit 0"]
    rows = _read_csv(res["paths"]["csv"])
    assert [(r["op"], r["shape"], r["backend"], float(r["x eager"])) for r in rows] == [
        ("softmax", "7x1025", "cpu", 3.5)]


def test_ops_run_with_out_keeps_the_committed_tables(monkeypatch, tmp_path):
    """--run --out DIR without --results: the quick reruns write into DIR and the merge reads
    them there, so they never replace benchmarks/results/' full tables."""
    bench.harness()
    scripts = tmp_path / "benchmarks"
    scripts.mkdir()
    out = tmp_path / "out"
    (scripts / "bench_ops.py").write_text(
        "import sys, os\n"
        "a = sys.argv[1:]\n"
        f"assert a[a.index('--out') + 1] == {str(out)!r}, a\n"
        "with open(os.path.join(a[a.index('--out') + 1], 'ops_cpu.csv'), 'w') as f:\n"
        "    f.write('# date: now\\nop,shape,dtype,backend,pass,ms,x eager\\n'\n"
        "            'softmax,7x1025,fp32,cpu,fwd,0.25,3.5\\n')\n")
    monkeypatch.setattr(bench, "BENCH_DIR", scripts)
    monkeypatch.setattr(bench, "DEFAULT_OUT", tmp_path / "committed")
    res = bench.bench_ops(run=True, device="cpu", out=str(out), sources="bench_ops",
                          plot=False)
    assert res["ran"] == ["bench_ops: exit 0"]
    assert (out / "ops_cpu.csv").is_file() and not (tmp_path / "committed").exists()
    assert res["paths"]["csv"] == str(out / "bench_ops_cpu.csv")
    assert [r["op"] for r in _read_csv(res["paths"]["csv"])] == ["softmax"]


def test_profile_categories():
    """The profile's categories, on kernel names from an H100 GPT-2 step (torch 2.11, our
    Triton kernels, cuBLAS's nvjet GEMMs, Inductor's fused kernels) and CPU op names."""
    cases = {
        "nvjet_sm90_tss_192x192_64x3_2x1_v_badd_coopB_bias_TNT": "GEMM",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "GEMM",
        "_bwd_dkdv_kernel": "attention", "_attn_fwd_kernel": "attention",
        "attn_dq_kernel": "attention",
        "void (anonymous namespace)::softmax_warp_forward<c10::BFloat16, float, 10>": "attention",
        "_ln_bwd_kernel": "layer/rms norm", "ln_fwd_persist_kernel": "layer/rms norm",
        "_rms_fwd_kernel": "layer/rms norm",
        "_ce_fwd_kernel": "cross entropy / lm head",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
        "at::native::(anonymous namespace)::SoftMaxForwardEpilogue>": "attention",
        "void at::native::(anonymous namespace)::cunn_SoftMaxBackward<4, float, float, float, "
        "at::native::(anonymous namespace)::LogSoftMaxBackwardEpilogue>":
            "cross entropy / lm head",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16, "
        "at::native::func_wrapper_t<float, at::native::sum_functor<...>>>>":
            "reductions (bias grads, norm partials)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl("
        "at::TensorIteratorBase&, at::native::GeluType)::{lambda(c10::BFloat16)#1}>":
            "GELU / SwiGLU",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda("
        "at::TensorIteratorBase&)::{lambda()#3}>": "copies and casts",
        "Memcpy DtoD (Device -> Device)": "copies and casts",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::"
        "(anonymous namespace)::TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>":
            "optimizer and clipping",
        "triton_red_fused_gelu_backward_sum_0": "torch.compile (Inductor) fused",
        "void at::native::(anonymous namespace)::indexSelectLargeIndex<float, long>": "embedding",
        "Memset (Device)": "fills",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>":
            "other elementwise",
        "aten::addmm": "GEMM", "_EagerLayerNormBackward": "layer/rms norm",
        "Optimizer.step#AdamW.step": "optimizer and clipping",
        "aten::sum": "reductions (bias grads, norm partials)",
        "some_new_kernel": "other",
    }
    assert {n: bench.profile_category(n) for n in cases} == cases
    # On the CPU: self times per category, summing to the total
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            (a @ a).sum(0)
    rows = bench.time_by_category(prof.events(), torch.device("cpu"))
    by = {r["category"]: r for r in rows}
    assert rows[-1]["category"] == "total"
    assert by["GEMM"]["calls"] >= 3 and by["GEMM"]["ms"] > 0
    assert by["reductions (bias grads, norm partials)"]["calls"] >= 3
    total = sum(e.self_cpu_time_total for e in prof.events() if e.device_type == DeviceType.CPU)
    assert by["total"]["ms"] == pytest.approx(total / 1e3)
    assert sum(r["ms"] for r in rows[:-1]) == pytest.approx(by["total"]["ms"])
    assert sum(r["%"] for r in rows[:-1]) == pytest.approx(100.0)
    assert [r["ms"] for r in rows[:-1]] == sorted((r["ms"] for r in rows[:-1]), reverse=True)
    # The copies by shape: a cast of a (3, 5) tensor twice, a (7,) copy once
    x, y = torch.randn(3, 5), torch.zeros(7)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        x.to(torch.float64), x.to(torch.float16), y.copy_(torch.ones(7))
    rows = bench.copies_by_shape(prof.key_averages(group_by_input_shape=True),
                                 torch.device("cpu"))
    assert sorted((r["shapes"], r["calls"]) for r in rows) == [("3x5 <- 3x5", 2), ("7 <- 7", 1)]
    assert all(r["ms"] >= 0 for r in rows)


def test_harness_kernel_time():
    """kernel_ms (GPU time per call from torch.profiler) is a CUDA-only column: {} elsewhere.
    Its summing helper reads the profiler's events by device type (checked here on CPU events,
    the same FunctionEvent API the CUDA kernels come through)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    H = bench.harness()
    assert H.kernel_ms({"f": lambda: None}, torch.device("cpu")) == {}
    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            a @ a
    assert H.device_us(prof.events(), DeviceType.CPU) > 0
    assert H.device_us(prof.events(), DeviceType.CUDA) == 0


def test_train_leaves_out_a_variant_that_fails(tmp_path, monkeypatch):
    # A variant that cannot run here (a compile failure, say) costs its own row, with the
    # reason in the results, not the whole run; our kernels failing still fails the run.
    step = bench._TrainVariant.step

    def failing(self):
        if self.name == "eager":
            raise RuntimeError("no such kernel\nsecond line")
        return step(self)

    monkeypatch.setattr(bench._TrainVariant, "step", failing)
    res = bench.bench_train("tiny", steps=1, device="cpu", variants="minigpt,eager",
                            out=str(tmp_path), plot=False)
    assert [r["variant"] for r in res["rows"]] == ["minigpt"]
    assert res["rows"][0]["x minigpt"] == pytest.approx(1.0)  # its own baseline now
    assert any("variant eager failed" in s and "no such kernel" in s for s in res["skipped"])
    md = open(res["paths"]["md"]).read()
    assert "variant eager failed" in md and "tiny: x minigpt" in md

    def mine_fails(self):
        raise RuntimeError("broken kernel")

    monkeypatch.setattr(bench._TrainVariant, "step", mine_fails)
    with pytest.raises(RuntimeError, match="broken kernel"):
        bench.bench_train("tiny", steps=1, device="cpu", variants="minigpt,eager",
                          out=str(tmp_path), plot=False)


def test_attention_bench_leaves_out_a_wrong_kernel(capsys):
    """bench_attention.py times only backends whose output matches SDPA's: a fast wrong kernel
    (a broken fragment layout, say) is left out with its error, not reported as a speedup."""
    ba = bench._load_script("bench_attention")
    torch.manual_seed(0)
    ref = torch.randn(2, 3, 5, 8)
    fwd = {"sdpa-flash": lambda: ref, "eager": lambda: ref + 1}
    assert ba._agrees("cuda", lambda: ref + 1e-4, fwd, torch.float32)
    assert ba._agrees("triton", lambda: ref.bfloat16(), fwd, torch.bfloat16)
    assert not ba._agrees("cuda", lambda: ref.flip(-1), fwd, torch.bfloat16)
    assert not ba._agrees("cpu", lambda: ref * float("nan"), fwd, torch.float32)
    assert ba._agrees("sdpa-math", lambda: ref + 1, fwd, torch.float32)  # not ours: not judged
    assert ba._agrees("cuda", lambda: ref + 1, {"eager": lambda: ref + 1}, torch.float32)
    out = capsys.readouterr().out
    assert out.count("left out: ") == 2 and "cuda's output differs from sdpa-flash's" in out
    rows = ba.bench_attention(torch.device("cpu"), torch.float32, Ds=[16], Ts=[7], bh=16,
                              passes=("fwd",))
    assert {r["backend"] for r in rows} >= {"cpu", "eager"}


def test_attention_plot_from_rows_and_from_csv(tmp_path):
    """bench_attention.py's TFLOP/s plot: drawn from its rows (kernel time where a GPU run
    measured it), and redrawn from a results CSV with --replot."""
    ba = bench._load_script("bench_attention")
    H = bench.harness()
    rows = []
    for D in (64, 128):
        for T in (512, 1024):
            for be, tf in (("triton", 100.0), ("sdpa-flash", 90.0)):
                for ps in ("fwd", "bwd"):
                    rows.append(dict(op="attention", shape=f"2x16x{T}x{D}", dtype="bf16",
                                     backend=be, **{"pass": ps}, ms=1.0,
                                     **{"TFLOP/s": tf, "kernel TFLOP/s": tf * 1.5}))
    rows.append(dict(op="attention", shape="2x16x1024x128 full", dtype="bf16", backend="triton",
                     **{"pass": "fwd"}, ms=1.0, **{"TFLOP/s": 5.0}))  # not on the causal plot
    rows.append(dict(op="decode", shape="4x32/8x256x128", dtype="bf16", backend="triton",
                     **{"pass": "fwd"}, ms=1.0, **{"TFLOP/s": 1.0}))
    assert _png_ok(ba.plot_attention(rows, str(tmp_path / "a.png")))
    assert ba.plot_attention([rows[-1]], str(tmp_path / "b.png")) is None  # nothing causal
    paths = H.write_results(rows, "attention", torch.device("cpu"), str(tmp_path))
    ba.replot(paths["csv"])
    assert _png_ok(os.path.splitext(paths["csv"])[0] + ".png")


def test_ops_bench_times_the_shared_sums_beside_the_default(monkeypatch):
    """bench_ops.py --cuda-ln-sums: the CUDA LayerNorm backward's shared-memory-sums kernel timed
    as a backend of its own in the same rounds, with MINIGPT_CUDA_LN_BWD_SUMS=shared set only
    while it runs (the launcher reads it at each launch). On the CPU the C++ backend stands in
    for cuda; the variable is what is checked."""
    bo = bench._load_script("bench_ops")
    seen = []
    make_case = bo.make_case

    def spying_case(*a, **k):
        inputs, eager, ours, fb, bb = make_case(*a, **k)

        def ours_cpu(be):
            fn = ours("cpu" if be == "cuda" else be)
            return lambda *t: (seen.append((be, os.environ.get(bo.SMEMSUMS_ENV))), fn(*t))[1]
        return inputs, eager, ours_cpu, fb, bb

    monkeypatch.setattr(bo, "make_case", spying_case)
    monkeypatch.delenv(bo.SMEMSUMS_ENV, raising=False)
    assert not bo._smemsums_applies("add_layer_norm", 4096, torch.float32, ["cuda"])
    assert not bo._smemsums_applies("add_layer_norm", 8192, torch.bfloat16, ["cuda"])
    assert not bo._smemsums_applies("softmax", 8192, torch.float32, ["cuda"])
    assert bo._smemsums_applies("layer_norm", 4100, torch.float32, ["triton", "cuda"])
    monkeypatch.setattr(bo, "_smemsums_applies", lambda *a: True)
    stats, _, _ = bo.bench_case("add_layer_norm", 8, 4100, torch.float32, torch.device("cpu"),
                                "fwd+bwd", ["cuda"], False, 0.01, smemsums=True)
    assert set(stats) == {"eager", "cuda", bo.SMEMSUMS}
    assert ("cuda", None) in seen and ("cuda", "shared") in seen
    assert bo.SMEMSUMS_ENV not in os.environ


def test_cuda_n_is_checked_and_made_current(monkeypatch):
    """--device cuda:N: refused past the devices torch sees; taken otherwise, and made the
    current device while a benchmark runs (CUDA events and synchronize() follow the current
    device: timing cuda:1 with cuda:0 current timed none of its work). The scripts were
    limited to cpu/cuda, and `minigpt bench ops --run --device cuda:1` ran them on cuda:0."""
    H = bench.harness()
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def set_device(d):  # as torch's: a device without an index is refused
        if torch.device(d).index is None:
            raise ValueError(f"Expected a torch.device with a specified index, but got:{d}")
        made_current.append(str(d))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert H.device_arg("cuda:1") == "cuda:1" and H.device_arg("cuda") == "cuda"
    with pytest.raises(argparse.ArgumentTypeError, match="torch sees 2 CUDA device"):
        H.device_arg("cuda:2")
    assert H.use_device("cuda:1") == torch.device("cuda:1") and made_current == ["cuda:1"]
    # Plain "cuda" (every script's default on a GPU) is the current device: it reached
    # set_device as it was and failed on the H100.
    assert H.use_device("cuda") == torch.device("cuda:1") and made_current == ["cuda:1"] * 2
    assert bench.parse_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="torch sees 2 CUDA device"):
        bench.parse_device("cuda:2")

    class Current:  # torch.cuda.device(d) as a context: records what was current inside
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            made_current.append(f"enter {self.d}")

        def __exit__(self, *exc):
            made_current.append(f"exit {self.d}")

    monkeypatch.setattr(torch.cuda, "device", Current)
    seen = []
    def stand_in(real):  # the real signature (inspect follows __wrapped__), no benchmark
        return functools.wraps(real)(lambda *a, **k: seen.append(list(made_current)))

    monkeypatch.setattr(bench, "_bench_decode", stand_in(bench._bench_decode))
    made_current.clear()
    bench.bench_decode("gpt", device="cuda:1")
    assert seen == [["enter cuda:1"]] and made_current == ["enter cuda:1", "exit cuda:1"]
    made_current.clear()
    monkeypatch.setattr(bench, "_bench_train", stand_in(bench._bench_train))
    bench.bench_train("seed", 5, None, "cuda:1")  # device given by position
    assert seen[-1] == ["enter cuda:1"] and made_current == ["enter cuda:1", "exit cuda:1"]


def test_ops_run_passes_the_device_index(monkeypatch, tmp_path):
    """bench ops --run --device cuda:1 hands cuda:1 to the scripts, not its type."""
    bench.harness()
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(bench.subprocess, "run",
                        lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(FileNotFoundError):  # the stand-in script wrote nothing to merge
        bench.bench_ops(run=True, device="cuda:1", results=str(tmp_path), sources="bench_ops",
                        plot=False)
    (cmd,) = calls
    assert cmd[cmd.index("--device") + 1] == "cuda:1"
