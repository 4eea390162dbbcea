"""Sweep the Triton LayerNorm / RMSNorm backward's launch shape on a GPU: rows per tile
(ROWS), warps, programs per SM. It prints and writes every candidate's kernel time against the
launcher's rule (kernels/_util.py bwd_shape); with --write, a candidate at least 5% faster
than the rule goes into kernels/norm_bwd_tuned.json for this GPU's architecture, which the
launchers then use at that op, width and h dtype (as kernels/attention_tuned.json for the
attention tiles); where the rule wins, an entry there is removed.

    python benchmarks/sweep_norm_bwd.py                  # the shapes below, on CUDA
    python benchmarks/sweep_norm_bwd.py --write          # and keep what beats the rule
    python benchmarks/sweep_norm_bwd.py --check-only     # correctness of every candidate only
                                                         # (runs in the CPU interpreter too)

Why: GPT-2's LayerNorm backward (16384 x 768, a bf16 branch on an fp32 residual stream) took
110 us a call on an H100, about half its bandwidth floor, and the 4096 x 1024 bf16 backward ran
at 0.49x eager's kernel time (benchmarks/results/bench_train_cuda-h100_profile.md,
ops_cuda-h100.md). The default puts 4096 values in a tile at 8 a thread (16 warps for rows of
1024); each candidate trades tile size, occupancy and the number of partial dweight rows.

Each candidate is first checked against the default's dx, dweight and dbias on the same
inputs (dx exactly, bar the interpreter's rounding; the weight sums within float32 reordering).
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import _harness as H  # noqa: E402

import minigpt  # noqa: E402,F401  (settles TRITON_INTERPRET before triton is imported)

# (op, M, N, x dtype, residual dtype or None): GPT-2 small's LayerNorm (bf16 branch on the fp32
# residual stream), the row-op benchmark's two sizes, SmolLM2's RMSNorm.
SHAPES = {
    "gpt2-ln": ("layer_norm", 16384, 768, torch.bfloat16, torch.float32),
    "ln-4096x1024": ("layer_norm", 4096, 1024, torch.bfloat16, None),
    "ln-16384x8192": ("layer_norm", 16384, 8192, torch.bfloat16, None),
    "smollm2-rms": ("rms_norm", 8192, 576, torch.bfloat16, torch.float32),
}
SMALL_SHAPES = [("layer_norm", 37, 96, torch.bfloat16, torch.float32),
                ("rms_norm", 21, 96, torch.float32, None)]
ROWS = (1, 2, 4, 8, 16)
# One or two warps a program: a row's reductions stay inside a warp (Triton spreads a [ROWS,
# BLOCK] tile's warps along the row, so with more warps each reduction crosses them through
# shared memory); such small programs need more of them on an SM to keep enough bytes in flight.
WARPS = (1, 2, 4, 8, 16)
PER_SM = (2, 4, 8)
PER_SM_SMALL = (8, 16, 32)  # for programs of one or two warps


def candidates(N):
    """Every (ROWS, warps, per_sm) the kernels take at width N, the default first."""
    from minigpt.kernels._util import bwd_shape, row_block

    block, single = row_block(N)
    out = [bwd_shape(block, single)]
    for rows in (ROWS if single else (1,)):
        for warps in WARPS:
            per_thread = rows * block // (32 * warps)
            # Fewer values than threads, or past 32 values of each operand a thread, where the
            # prefetched next tile spills (tests/test_triton_compile.py's table).
            if not 1 <= per_thread <= 32:
                continue
            for per_sm in (PER_SM_SMALL if warps <= 2 else PER_SM):
                out.append((rows, warps, per_sm))
    return list(dict.fromkeys(out))


def inputs(op, M, N, xd, rd, device, seed=0):
    """What the op's backward gets: dy (x's dtype), dh (the residual stream's gradient), the
    saved h and statistics."""
    from minigpt import ops  # noqa: F401
    from minigpt.kernels import layer_norm as ln, rms_norm as rms

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, w = rnd(M, N, dtype=xd), rnd(N) * 0.5 + 1
    r = rnd(M, N, dtype=rd) if rd is not None else None
    if op == "layer_norm":
        _, h, mean, rstd = ln.layer_norm_fwd(x, w, rnd(N), r, 1e-5, xd if r is not None else None)
        stats = (mean, rstd)
    else:
        _, h, rstd = rms.rms_norm_fwd(x, w, r, 1e-6, xd if r is not None else None)
        stats = (rstd,)
    h = h if r is not None else x
    dy = rnd(M, N, dtype=xd)
    dh = rnd(M, N, dtype=h.dtype) if r is not None else None
    return dy, dh, h, w, stats, (xd if r is not None else None)


def runner(op, args, config):
    from minigpt.kernels import layer_norm as ln, rms_norm as rms

    dy, dh, h, w, stats, x_dtype = args
    if op == "layer_norm":
        return lambda: ln.layer_norm_bwd(dy, dh, h, w, *stats, True, x_dtype, config=config)
    return lambda: rms.rms_norm_bwd(dy, dh, h, w, *stats, x_dtype, config=config)


def check(op, args, config, want):
    got = runner(op, args, config)()
    for a, b in zip(got, want):
        if a.numel() or b.numel():
            # dx: the same per-row arithmetic, rounded to its dtype (bf16 dx may differ by one
            # ulp when a launch shape reduces c1/c2 in another order); dweight/dbias: fp32
            # sums over rows in another order.
            tol = {} if a.dtype in (torch.bfloat16, torch.float16) else dict(rtol=2e-5, atol=2e-4)
            torch.testing.assert_close(a, b, **tol)


WRITE_MIN_GAIN = 1.05


def write_tuned(results, path, arch, device_name, date):
    """Update the tuned table at ``path`` for ``arch`` from ``results``: (key, best candidate,
    its kernel ms, its speed-up over the rule, the shape measured). Returns the lines it
    printed."""
    import json

    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    entries = table.setdefault(arch, {})
    said = []
    for key, cand, ms, gain, where in results:
        if gain is not None and gain >= WRITE_MIN_GAIN:
            entries[key] = {"shape": list(cand), "x_rule": round(gain, 3),
                            "kernel_us": round(ms * 1e3, 1), "measured": where,
                            "device": device_name, "date": date}
            said.append(f"{key}: {tuple(cand)} ({gain:.2f}x the rule) -> {path}")
        elif entries.pop(key, None) is not None:
            said.append(f"{key}: the rule is as fast; entry removed from {path}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return said


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check-only", action="store_true",
                    help="check every candidate against the default, time nothing")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"comma list from {list(SHAPES)} (GPU; the CPU checks toy shapes)")
    ap.add_argument("--budget", type=float, default=0.2, help="timing seconds per candidate")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--write", action="store_true",
                    help="put a candidate >= 5%% faster than the rule into "
                         "kernels/norm_bwd_tuned.json (the launchers use it)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.check_only:
        sys.exit("sweep_norm_bwd.py times Triton kernels on a GPU; on this machine use "
                 "--check-only (torch.cuda.is_available() is False).")
    names = [n for n in args.shapes.split(",") if n]
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        ap.error(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    shapes = [SHAPES[n] for n in names] if device.type == "cuda" else SMALL_SHAPES
    rows = []
    for op, M, N, xd, rd in shapes:
        a = inputs(op, M, N, xd, rd, device)
        cands = candidates(N)
        if device.type != "cuda":  # the interpreter: a spread of them, to keep it quick
            cands = cands[:1] + cands[1::max(1, len(cands) // 6)]
        want = runner(op, a, cands[0])()
        fns = {}
        for c in cands:
            check(op, a, c, want)
            fns[str(c)] = runner(op, a, c)
        shape = f"{M}x{N} {H.dtype_name(xd)}" + (f" + {H.dtype_name(rd)} residual" if rd else "")
        print(f"{op} {shape}: {len(cands)} candidates agree with the default", flush=True)
        if args.check_only:
            continue
        kern = H.kernel_ms(fns, device)
        ms = H.time_fns(fns, device, budget_s=args.budget)
        base = kern.get(str(cands[0]))
        for c in cands:
            k = kern.get(str(c))
            rows.append({"op": op, "shape": shape, "ROWS, warps, per SM": str(c),
                         "default": c == cands[0], "kernel ms": k, "ms": ms[str(c)],
                         "x default": (base / k) if (k and base) else None})
        best = min((r for r in rows if r["shape"] == shape and r["op"] == op and r["kernel ms"]),
                   key=lambda r: r["kernel ms"])
        print(f"  fastest {best['ROWS, warps, per SM']}: {best['kernel ms'] * 1e3:.1f} us, "
              f"{best['x default']:.2f}x the default", flush=True)
        from minigpt.kernels._util import norm_bwd_key, row_block

        hd = a[2].dtype  # h: the residual stream's dtype where there is one
        best_c = next(c for c in cands if str(c) == best["ROWS, warps, per SM"])
        tuned = [(norm_bwd_key(op, row_block(N)[0], hd), best_c, best["kernel ms"],
                  best["x default"], shape)]
        if args.write:  # shape by shape: a run stopped at its time limit keeps what it found
            from minigpt.kernels._util import NORM_BWD_TUNED_PATH, capability_name

            for line in write_tuned(tuned, NORM_BWD_TUNED_PATH, capability_name(device),
                                    torch.cuda.get_device_name(device), H.env_header(
                                        device)["date"]):
                print(line, flush=True)
    if rows:
        H.print_table(rows, list(rows[0]))
        paths = H.write_results(rows, "sweep_norm_bwd", device, args.out,
                                title="Triton norm backward launch shapes",
                                notes="kernel ms: GPU time per call (torch.profiler); x default: "
                                      "the default shape's kernel time over the candidate's.",
                                columns=list(rows[0]))
        print(f"wrote {paths['md']} and {paths['csv']}")


if __name__ == "__main__":
    main()
