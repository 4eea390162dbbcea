"""What the register caps buy: the Triton attention kernels' GPU time with
kernels/_util.capped_launch's caps and without (MINIGPT_REG_CAP=0's plain launch), measured
side by side in one run, per kernel.

    python benchmarks/bench_reg_cap.py            # on CUDA; writes results/reg_cap_<gpu>.md
    python benchmarks/bench_reg_cap.py --quick    # the goal shapes only

Why: a kernel a couple of registers over a block boundary loses a block per SM. The D 128
causal forward at T 512 (bench_attention's B * H = 32) went from 128 to 130 registers with an
output-stride change, from two blocks an SM to one, and from 1.02x to 0.85x SDPA-flash on an
H100. capped_launch gives such a kernel the cap at the boundary where ptxas compiles it without
spills; this measures, for every attention kernel it capped at these shapes, whether the block
it wins is worth the registers it takes. The `cap` column is the register cap (blank: none).

Rows: bench_attention's shapes (B * H = 32, D 64 and 128, T 512 to 4096) and GPT-2 small's
training step (B 16, H 12, T 1024, D 64), bf16, causal, forward and backward. Times are GPU
time per call (torch.profiler, kernels only), the median of rounds that alternate the two.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import _harness as H  # noqa: E402

import minigpt  # noqa: E402,F401  (settles TRITON_INTERPRET before triton is imported)
from minigpt.kernels import _util  # noqa: E402
from minigpt.kernels import attention as attn  # noqa: E402

SHAPES = [(2, 16, T, D) for D in (64, 128) for T in (512, 1024, 2048, 4096)] + [
    (16, 12, 1024, 64)]
# The goal shapes the caps change: the D 128 forward at T 512, the D 64 dK/dV at T >= 1024
# (bench_attention's backward rows at 0.97-1.12x SDPA-flash, goal 0.9x) and GPT-2's.
QUICK = [(2, 16, 512, 128), (2, 16, 512, 64), (2, 16, 2048, 64), (16, 12, 1024, 64)]
COLUMNS = ["shape", "kernel", "cap", "uncapped us", "capped us", "x uncapped"]


def per_kernel_us(fn, device, iters=10):
    """{kernel name: GPU us per call} of what ``fn`` runs."""
    from torch.autograd import DeviceType

    out = defaultdict(float)
    for e in H.profiled_events(fn, device, iters):
        if e.device_type == DeviceType.CUDA:
            out[e.name] += e.time_range.elapsed_us() / iters
    return out


def bench_shape(device, B, Hh, T, D, rounds):
    """Rows of one shape: each kernel's median GPU time capped and uncapped, and its cap."""
    q, k, v, do = (torch.randn(B, Hh, T, D, device=device, dtype=torch.bfloat16)
                   for _ in range(4))
    scale = D ** -0.5

    def step():
        out, lse = attn.attention_fwd(q, k, v, True, scale)
        attn.attention_bwd(do, q, k, v, out, lse, True, scale)

    caps = {}  # kernel name -> the cap its launches here run with
    launch = attn.capped_launch

    def recording(kernel, grid, key, device_, *args, **kwargs):
        out = launch(kernel, grid, key, device_, *args, **kwargs)
        if _util.REG_CAP and not _util.interpreting():
            caps[kernel.__name__] = _util._caps.get(_util.cap_key(kernel, key, device_, args))
        return out

    samples = {True: defaultdict(list), False: defaultdict(list)}
    attn.capped_launch = recording
    try:
        for r in range(rounds):
            for capped in ((True, False) if r % 2 == 0 else (False, True)):
                _util.REG_CAP = capped
                for name, us in per_kernel_us(step, device).items():
                    samples[capped][name].append(us)
    finally:
        attn.capped_launch = launch
        _util.REG_CAP = True
    rows = []
    for name in sorted(samples[True]):
        on = statistics.median(samples[True][name])
        off = statistics.median(samples[False].get(name, [float("nan")]))
        # The profiler names a Triton kernel by its function name.
        cap = next((c for kname, c in caps.items() if kname in name), None)
        rows.append({"shape": f"{B}x{Hh}x{T}x{D}", "kernel": name, "cap": cap,
                     "uncapped us": off, "capped us": on,
                     "x uncapped": off / on if on > 0 else None})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the goal shapes the caps change")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_reg_cap: needs a CUDA GPU (register caps are a GPU launch option)")
    device = torch.device("cuda")
    # Taken once, at the start: write_results, given none, reads the date and load average
    # when the run ends, minutes later.
    header = H.env_header(device)
    print(H.header_markdown(header, "register caps"))
    rows = []
    for B, Hh, T, D in (QUICK if args.quick else SHAPES):
        new = bench_shape(device, B, Hh, T, D, args.rounds)
        H.print_table(new, COLUMNS, header=not rows)
        rows += new
    notes = ("GPU time per call of each kernel (torch.profiler), median of "
             f"{args.rounds} rounds alternating capped and uncapped launches of the same "
             "binaries. `cap`: the register cap capped_launch chose at this shape (blank: "
             "none, the same binary both ways). `x uncapped` > 1: the cap is faster.")
    paths = H.write_results(rows, "reg_cap", device, args.out, title="register caps",
                            notes=notes, header=header, columns=COLUMNS)
    print(f"wrote {paths['md']} and {paths['csv']}")


if __name__ == "__main__":
    main()
