"""quant_matmul benchmark: the packed-GGUF decode matmul (csrc/quant_matmul.cpp) on
SmolLM2-135M's decode shapes, against F.linear on the float32 weights it stands in for.

    python benchmarks/bench_quant_matmul.py               # M = 1, 2, 4, 8, 16 rows of x
    python benchmarks/bench_quant_matmul.py --quick       # M = 1 and 8, fewer rounds
    python benchmarks/bench_quant_matmul.py --no-fp32     # without the float32 baseline

A SmolLM2-135M decode step makes 151 of these calls: 30 layers x {fused qkv 960x576, o_proj
576x576, gate 1536x576, up 1536x576, down 576x1536}, all Q4_1, and lm_head 49152x576 in Q8_0
(N x K; the model's own types). Each round runs one whole step in that order over 151 distinct
weights (random bytes in the real block layout, with ordinary fp16 scales), so every call reads
weights that are not in cache, as in decoding: one weight called in a loop would stay in L2 and
time something else. ``ms`` is the median over rounds and layers of one call of that shape,
``min ms`` the fastest; the ``decode step`` row is the median whole step (its 151 calls plus
Python's per-call cost). Backends take turns in blocks of 4 steps, the first untimed, so our
steps do not start from the cache the float32 step (~540 MB) emptied. GB/s counts the packed
bytes read (the float32 weights for ``fp32``). ``fp32`` is F.linear on the dequantized float32
weights, what PackedLinear does for other inputs; ``x eager`` is its time over ours. On a
shared VM the memory bandwidth a core gets drifts by up to 2x within minutes (other tenants),
moving every row: compare runs side by side.
Writes ``<out>/quant_matmul_<device tag>.csv`` and ``.md`` (benchmarks/_harness.py: machine
header).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _harness as H  # noqa: E402

import minigpt  # noqa: E402,F401  (settles TRITON_INTERPRET before triton is imported)
from minigpt import _backend, quant  # noqa: E402

COLUMNS = ["op", "shape", "dtype", "backend", "ms", "min ms", "GB/s", "x eager"]
LAYER = [("qkv", 960, 576), ("o_proj", 576, 576), ("gate", 1536, 576), ("up", 1536, 576),
         ("down", 576, 1536)]
N_LAYERS = 30
LM_HEAD = ("lm_head", 49152, 576)
QNAME = {quant.Q4_1: "Q4_1", quant.Q8_0: "Q8_0"}


def random_packed(n: int, k: int, qtype: int, g: torch.Generator) -> torch.Tensor:
    """(n, k/32 * block bytes) uint8 in GGUF's block layout: random codes, fp16 scales of the
    size real weights have (no infinities or NaNs from random scale bits)."""
    nb, bs = k // 32, quant.BLOCK_BYTES[qtype]
    b = torch.randint(0, 256, (n, nb, bs), dtype=torch.uint8, generator=g)
    d = torch.rand(n, nb, 1, generator=g) * 0.01 + 1e-3
    b[..., 0:2] = d.half().view(torch.uint8).reshape(n, nb, 2)
    if qtype == quant.Q4_1:
        m = -torch.rand(n, nb, 1, generator=g) * 0.05
        b[..., 2:4] = m.half().view(torch.uint8).reshape(n, nb, 2)
    return b.reshape(n, nb * bs).contiguous()


def decode_calls(g: torch.Generator):
    """The 151 (name, N, K, qtype, packed) of one decode step, in the model's order."""
    calls = [(name, n, k, quant.Q4_1, random_packed(n, k, quant.Q4_1, g))
             for _ in range(N_LAYERS) for name, n, k in LAYER]
    name, n, k = LM_HEAD
    calls.append((name, n, k, quant.Q8_0, random_packed(n, k, quant.Q8_0, g)))
    return calls


def run_step(fn, weights, calls, xs, per_call):
    """One decode step; appends each call's seconds to per_call[name]. Returns the total."""
    pc = time.perf_counter
    t0 = pc()
    for (name, n, k, qtype, _), w in zip(calls, weights):
        a = pc()
        fn(xs[k], w, qtype, n)
        per_call[name].append(pc() - a)
    return pc() - t0


def bench_m(M, calls, fp32_weights, rounds, g):
    ext = _backend._ext()
    xs = {k: torch.randn(M, k, generator=g) for k in (576, 1536)}
    fns = {"cpu": (lambda x, w, qt, n: ext.quant_matmul(x, w, qt, n),
                   [c[4] for c in calls])}
    if fp32_weights is not None:
        fns["fp32"] = (lambda x, w, qt, n: F.linear(x, w), fp32_weights)
    names = [c[0] for c in calls[:len(LAYER)]] + [LM_HEAD[0]]
    per = {be: {n: [] for n in names} for be in fns}
    steps = {be: [] for be in fns}
    # Blocks of steps per backend, the first of each block untimed: the float32 step streams
    # ~540 MB and would leave ours starting from an emptied cache if the two alternated.
    block = 4
    for _ in range(-(-rounds // (block - 1))):
        for be, (fn, weights) in fns.items():
            for i in range(block):
                scratch = {n: [] for n in names}
                total = run_step(fn, weights, calls, xs, scratch)
                if i and len(steps[be]) < rounds:
                    steps[be].append(total)
                    for n in names:
                        per[be][n] += scratch[n]
    rows = []
    shapes = [(n, nn, k, quant.Q4_1) for n, nn, k in LAYER] + [LM_HEAD + (quant.Q8_0,)]
    step_bytes = {"cpu": sum(c[4].numel() for c in calls),
                  "fp32": sum(c[1] * c[2] * 4 for c in calls)}
    for name, n, k, qtype in shapes + [("decode step", None, None, None)]:
        ms_of = {}
        for be in fns:
            v = steps[be] if n is None else per[be][name]
            ms_of[be] = (statistics.median(v) * 1e3, min(v) * 1e3)
        for be in fns:
            if n is None:
                shape, dtype, nbytes = f"{M}x(151 calls)", "Q4_1+Q8_0", step_bytes[be]
            else:
                shape, dtype = f"{M}x{n}x{k}", QNAME[qtype]
                nbytes = n * (k // 32) * quant.BLOCK_BYTES[qtype] if be == "cpu" else n * k * 4
            if be == "fp32":
                dtype = "fp32"
            eager = ms_of["fp32"][0] if "fp32" in ms_of else None
            rows.append(H.row(op=name, shape=shape, dtype=dtype, backend=be, pass_="fwd",
                              ms=ms_of[be][0], nbytes=nbytes, eager_ms=eager,
                              **{"min ms": ms_of[be][1]}))
    return rows


def _positive_ints(text):
    """argparse type of --m: comma-separated positive integers."""
    try:
        ms = [int(m) for m in text.split(",") if m.strip()]
    except ValueError:
        ms = []
    if not ms or min(ms) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {text!r}")
    return ms


def _positive_int(text):
    """argparse type of --rounds: 0 rounds leave no sample to take a median of."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, got {text!r}")
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="M = 1 and 8, fewer rounds")
    ap.add_argument("--m", type=_positive_ints, default=None,
                    help="comma-separated rows of x (default 1,2,4,8,16)")
    ap.add_argument("--rounds", type=_positive_int, default=None,
                    help="decode steps timed per M")
    ap.add_argument("--no-fp32", action="store_true", help="skip the float32 F.linear baseline")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not quant.kernel_available():
        sys.exit("minigpt._C has no quant_matmul: build it with scripts/build_ext.sh")
    device = torch.device("cpu")
    Ms = args.m or ([1, 8] if args.quick else [1, 2, 4, 8, 16])
    rounds = args.rounds or (10 if args.quick else 30)
    g = torch.Generator().manual_seed(0)
    calls = decode_calls(g)
    fp32 = None if args.no_fp32 else [quant.dequantize(c[4], c[3], c[2]) for c in calls]
    # Taken once, at the start: write_results, given none, reads the date and load average
    # when the run ends, minutes later.
    header = H.env_header(device)
    print(H.header_markdown(header, "quant_matmul benchmark"))
    rows = []
    for M in Ms:
        part = bench_m(M, calls, fp32, rounds, g)
        H.print_table(part, COLUMNS, header=not rows)
        rows += part
    notes = __doc__.split("\n\n", 2)[2].rsplit("\nWrites", 1)[0]
    paths = H.write_results(rows, "quant_matmul", device, args.out,
                            title="quant_matmul benchmark", notes=notes, header=header,
                            columns=COLUMNS)
    print(f"wrote {paths['md']} and {paths['csv']}")


if __name__ == "__main__":
    main()
