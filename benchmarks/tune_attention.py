"""Tune the Triton attention tiles on this GPU and record the fastest in
kernels/attention_tuned.json, which kernels/attention.tiles() reads.

    python benchmarks/tune_attention.py                     # bf16, head dims 64 and 128
    python benchmarks/tune_attention.py --dtype fp32 --head-dims 64
    python benchmarks/tune_attention.py --dry-run           # measure and report only
    python benchmarks/tune_attention.py --seqlen 512 --kernel-time   # the "/short" entries
    python benchmarks/tune_attention.py --head-dims 64 --causal yes --batch 16 --heads 12 \
        --seqlen 1024 --kernels dkdv dq --kernel-time               # GPT-2's training shape

A "point" is one kernel (fwd, dkdv or dq), precision (16-bit or fp32), BLOCK_D and causal
flag: the key under which attention.tiles() looks tiles up. For each point the script
  1. runs every candidate tile (BLOCK_M, BLOCK_N, num_warps, num_stages) from the lists below
     plus the launcher's current choice, once, at a ragged GQA shape (T=200, S=260, 4 query
     heads on 2 kv heads) against the fp32 reference; a candidate that does not compile
     (Triton's OutOfResources: too much shared memory) or is wrong is dropped and listed;
  2. times the survivors round-robin (benchmarks/_harness.py) at B=2, H=16, T=S=4096 (B*H=32,
     as bench_attention.py; --batch, --heads, --seqlen change it), the forward alone, or the whole backward with the other
     backward kernel's tiles fixed (dkdv is tuned first, then dq with the dkdv winner);
  3. keeps the fastest.
bf16 and fp16 use the same tensor-core tiles, so the 16-bit entries are tuned in bf16.

Writes benchmarks/results/tune_attention_<device>.{csv,md} with every candidate's time, and
merges the winners into kernels/attention_tuned.json under this GPU's architecture ("sm90"),
keyed "<point>/short" when the timed grid is under a wave at the table's tiles (a short
--seqlen: the launchers take those entries for such grids, attention.launch_tiles),
with the device, date, versions and the default's time beside each. Commit both. The sm_90
compile test (tests/test_triton_compile.py) then builds the tuned tiles on every CI run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import _harness as H  # noqa: E402

import minigpt  # noqa: E402,F401  (settles TRITON_INTERPRET before triton is imported)
from minigpt import reference  # noqa: E402

KERNELS = ("fwd", "dkdv", "dq")

# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M counts queries, BLOCK_N keys. Around the
# FlashAttention-2 and Triton-tutorial choices: the forward and dQ hold a query block and
# stream keys, dK/dV holds a key block and streams queries.
CANDIDATES_16BIT = {
    # The 32- and 64-query ones serve short grids (T = 512 at B * H = 32: 512 or 256 programs
    # on 132 SMs), where the table's 128 leaves SMs idle.
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2),
            (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 3),
            (32, 64, 4, 3)],
    # A fifth entry 1: dQ by atomics from the dK/dV kernel, no dQ kernel (attention.atomic_dq);
    # 8 warps: at 4 the extra dQ tile spilled on sm_90 (D 128: 100-676 bytes a thread).
    "dkdv": [(64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3), (32, 128, 4, 3), (32, 128, 8, 3),
             (64, 128, 8, 2), (32, 64, 8, 3, 1), (32, 128, 8, 3, 1), (64, 64, 8, 2, 1)],
    "dq": [(64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3), (128, 32, 4, 3), (128, 32, 8, 3),
           (128, 64, 8, 2)],
}
CANDIDATES_FP32 = {
    "fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2),
            (32, 64, 4, 2)],
    "dkdv": [(32, 64, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2), (32, 32, 8, 2), (16, 64, 4, 2)],
    "dq": [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2), (64, 16, 4, 2)],
}
TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def candidates(kernel, dtype, block_d, causal, device, length=None, heads=None):
    """The candidate list of one point, the launcher's current tiles first (deduplicated).
    With ``length`` and ``heads`` (the timed shape's sequence length and B * H), also the
    tiles the launcher actually runs there: at a short length its small-grid rule
    (attention._fill_sms) halves the table's tiles."""
    from minigpt.kernels import attention as attn

    table = CANDIDATES_FP32 if dtype == torch.float32 else CANDIDATES_16BIT
    current = tuple(attn.tiles(kernel, dtype, block_d, causal, device))
    out = [current]
    if length is not None and heads is not None:
        # What the launcher runs there (a "/short" entry or the halved tiles) first: the
        # default the others are compared with.
        out = [tuple(attn.launch_tiles(kernel, dtype, block_d, causal, device, False, length,
                                       heads)),
               current, tuple(attn._fill_sms(current, kernel, length, heads, device))]
    out += [tuple(c) for c in table[kernel]]
    return list(dict.fromkeys(out))


def entry_key(kernel, dtype, block_d, causal, device, length, heads):
    """The tuned table's key for a point timed at ``length`` with ``heads`` programs a block
    row: the plain key, or with attention.SHORT where the table's tiles leave SMs idle there
    (the launcher then looks for the "/short" entry)."""
    from minigpt.kernels import attention as attn

    key = attn.config_key(kernel, dtype, block_d, causal)
    table_tiles = attn.tiles(kernel, dtype, block_d, causal, device)
    return key + (attn.SHORT if attn._under_a_wave(table_tiles, kernel, length, heads, device)
                  else "")


def merge_table(path, arch, entries):
    """Merge {key: entry} into the JSON table at ``path`` under ``arch``, atomically (a temp
    file, then rename), keeping every other entry and architecture."""
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    table.setdefault(arch, {}).update(entries)
    table = {a: dict(sorted(v.items())) for a, v in sorted(table.items())}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return table


def _inputs(B, Hq, Hkv, T, S, D, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    return r(B, Hq, T, D), r(B, Hkv, S, D), r(B, Hkv, S, D), r(B, Hq, T, D)


class Point:
    """One tuning point: its inputs, a correctness check and a timed callable per tile."""

    def __init__(self, kernel, dtype, D, causal, device, big, small=(1, 4, 2, 200, 260)):
        from minigpt.kernels import attention as attn

        self.attn, self.kernel, self.dtype, self.D, self.causal = attn, kernel, dtype, D, causal
        self.device = device
        self.scale = D ** -0.5
        self.block_d = attn._block_d(D)
        self.key = attn.config_key(kernel, dtype, self.block_d, causal)
        # Small ragged GQA case, checked against the fp32 reference.
        self.small = _inputs(*small, D, dtype, device, seed=0)
        q, k, v, do = (t.detach().float().clone().requires_grad_() for t in self.small)
        ref = reference.attention(q, k, v, causal=causal, scale=self.scale)
        ref.backward(do)
        self.ref = {"out": ref.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        B, Hh, T = big
        self.big = _inputs(B, Hh, Hh, T, T, D, dtype, device, seed=1)
        self.flops = 4 * B * Hh * T * T * D * (0.5 if causal else 1.0)
        if kernel != "fwd":
            self.flops *= 2.5
            self.big_fwd = attn.attention_fwd(*self.big[:3], causal, self.scale)
            self.small_fwd = attn.attention_fwd(*self.small[:3], causal, self.scale)

    def run(self, tiles, inputs, fwd=None, dkdv_tiles=None):
        q, k, v, do = inputs
        a = self.attn
        if self.kernel == "fwd":
            return {"out": a.attention_fwd(q, k, v, self.causal, self.scale, config=tiles)[0]}
        if self.kernel == "dkdv":
            cfg = {"dkdv_config": tiles}
        else:
            cfg = {"dkdv_config": dkdv_tiles, "dq_config": tiles}
        dq, dk, dv = a.attention_bwd(do, q, k, v, *fwd, self.causal, self.scale, **cfg)
        return {"dq": dq, "dk": dk, "dv": dv}

    def check(self, tiles, dkdv_tiles=None):
        """None if the tiles give the reference's answer, else why not."""
        try:
            got = self.run(tiles, self.small, getattr(self, "small_fwd", None), dkdv_tiles)
            H.sync(self.device)
        except Exception as e:  # OutOfResources and other compile failures
            return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        for name, t in got.items():
            ref = self.ref[name]
            err = (t.float() - ref).abs().max().item()
            bound = TOL[self.dtype] * max(1.0, ref.abs().max().item())
            if not err <= bound:
                return f"{name} error {err:.2e} > {bound:.2e}"
        return None

    def timer(self, tiles, dkdv_tiles=None):
        fwd = getattr(self, "big_fwd", None)
        return lambda: self.run(tiles, self.big, fwd, dkdv_tiles)


def tune_point(point, cands, device, budget_s, dkdv_tiles=None, by_kernel=False):
    """-> (a row for every candidate, the winning tiles, {"ms", "default_ms"}); the last two
    are None when no candidate passed the check. ``by_kernel``: rank by the kernels' GPU time
    (torch.profiler) rather than the time per call, which at short lengths is mostly the
    host's launch time (T = 512: ~50 us of kernels)."""
    fns, rows = {}, []
    for c in cands:
        why = point.check(c, dkdv_tiles)
        if why is None:
            fns[str(c)] = (c, point.timer(c, dkdv_tiles))
        else:
            rows.append({"point": point.key, "tiles": str(c), "status": why})
    calls = {k: f for k, (c, f) in fns.items()}
    stats = H.time_fns_stats(calls, device, budget_s=budget_s)
    kern = H.kernel_ms(calls, device) if by_kernel else {}
    metric = {k: (kern.get(k) if by_kernel else s["median"]) for k, s in stats.items()}
    metric = {k: v for k, v in metric.items() if v}
    default = str(cands[0])
    for k, s in stats.items():
        rows.append({"point": point.key, "tiles": k, "status": "ok", "ms": s["median"],
                     "kernel ms": kern.get(k),
                     "TFLOP/s": point.flops / metric[k] / 1e9 if k in metric else None,
                     "x default": (metric[default] / metric[k]
                                   if default in metric and k in metric else None)})
    if not metric:
        return rows, None, None
    best = min(metric, key=metric.get)
    return rows, fns[best][0], {"ms": metric[best], "default_ms": metric.get(default)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--seqlen", type=int, default=4096,
                    help="T = S of the timed shape; one short enough that the table's tiles "
                         "leave SMs idle (512 at B * H = 32 on an H100) tunes the points' "
                         "\"/short\" entries, which the launchers use for such grids")
    ap.add_argument("--batch", type=int, default=2, help="B of the timed shape")
    ap.add_argument("--heads", type=int, default=16,
                    help="H of the timed shape (GPT-2 small: --batch 16 --heads 12 --seqlen "
                         "1024 --head-dims 64, the shape of its training step)")
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS),
                    help="which kernels to tune (dq is timed with dK/dV's table tiles unless "
                         "dkdv is tuned in the same run)")
    ap.add_argument("--budget", type=float, default=0.5, help="timing seconds per point")
    ap.add_argument("--dry-run", action="store_true", help="do not write attention_tuned.json")
    ap.add_argument("--kernel-time", action="store_true",
                    help="rank by the kernels' GPU time (torch.profiler), not the time per "
                         "call: for short lengths, where the launch time dominates a call")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_attention.py times Triton kernels on a GPU; this machine has no CUDA "
                 "device (torch.cuda.is_available() is False).")
    from minigpt.kernels import attention as attn
    from minigpt.kernels._util import capability_name

    device = torch.device("cuda", torch.cuda.current_device())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    causals = {"both": [True, False], "yes": [True], "no": [False]}[args.causal]
    header = H.env_header(device)
    big = (args.batch, args.heads, args.seqlen)
    rows, winners = [], {}
    for D in args.head_dims:
        for causal in causals:
            dkdv_best = None
            for kernel in [k for k in KERNELS if k in args.kernels]:
                if kernel == "dq" and dkdv_best is not None and attn.atomic_dq(dkdv_best):
                    print(f"dq D={D} causal={causal}: the dK/dV winner computes dQ by atomics "
                          "(no dQ kernel runs): not tuned", flush=True)
                    continue
                point = Point(kernel, dtype, D, causal, device, big)
                cands = candidates(kernel, dtype, point.block_d, causal, device,
                                   length=big[2], heads=big[0] * big[1])
                got, best, info = tune_point(point, cands, device, args.budget,
                                             dkdv_tiles=dkdv_best, by_kernel=args.kernel_time)
                rows += got
                if kernel == "dkdv":
                    dkdv_best = best
                if best is None:
                    print(f"{point.key}: no candidate ran", flush=True)
                    continue
                key = entry_key(kernel, dtype, point.block_d, causal, device, big[2],
                                big[0] * big[1])
                winners[key] = {
                    "tiles": list(best), "ms": round(info["ms"], 4),
                    "default_ms": None if info["default_ms"] is None
                    else round(info["default_ms"], 4),
                    "shape": f"B={big[0]} H={big[1]} T=S={big[2]} D={D} {args.dtype}",
                    "device": header["device"], "date": header["date"],
                    "torch": header["torch"], "triton": header["triton"]}
                print(f"{key}: {tuple(best)} {info['ms']:.3f} ms "
                      f"(default {info['default_ms']})", flush=True)
                if not args.dry_run:  # point by point: a stopped run keeps what it found
                    merge_table(attn.TUNED_PATH, capability_name(device), {key: winners[key]})
    H.write_results(rows, "tune_attention", device, args.out,
                    title="Triton attention tile tuning",
                    notes="Every candidate per point (kernel/precision/BLOCK_D/causal); the "
                          "first of each point is the launcher's choice before this run. "
                          "Backward rows time the whole backward. ms: per call; kernel ms: "
                          "GPU time (with --kernel-time, what TFLOP/s, x default and the "
                          "ranking use).",
                    header=header, columns=["point", "tiles", "status", "ms", "kernel ms",
                                            "TFLOP/s", "x default"])
    if not args.dry_run and winners:
        print(f"wrote {len(winners)} entries to {attn.TUNED_PATH}")


if __name__ == "__main__":
    main()
