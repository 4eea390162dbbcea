"""Training-op benchmarks: each op's kernel backends against eager PyTorch (the reference) and
torch.compile of the reference, forward and forward+backward, time and peak memory.

    python benchmarks/bench_training_ops.py                  # this machine's device, all ops
    python benchmarks/bench_training_ops.py --ops rms_norm --quick
    python benchmarks/bench_training_ops.py --device cuda

Writes ``<out>/training_ops_<device tag>.csv`` and ``.md`` (benchmarks/_harness.py: timing
rules, machine header). Peak memory is what a call adds on top of its live inputs: on CUDA
torch.cuda.max_memory_allocated, on CPU the rise of the process's peak resident set (VmHWM,
reset per measurement; large allocations are forced onto mmap so freed memory leaves the
process and a peak cannot hide in memory malloc kept from an earlier call).

Each op is one ``bench_<op>(device, quick) -> [Case]`` function registered in OPS; add an op by
writing one more (see ``Case``). Our backends are all that run on the device, except Triton on
CPU: there it is the interpreter, a correctness tool, not a speed path.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and (
        sys.platform.startswith("linux")):
    # A fixed mmap threshold (glibc reads it at start-up only, hence the re-exec) sends every
    # allocation above 64 KiB straight to mmap/munmap, so the CPU peak-RSS measurement sees it.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import _harness as H  # noqa: E402  (timing rules, machine header, CSV/markdown writer)

import minigpt  # noqa: E402,F401  (settles TRITON_INTERPRET before triton is imported)
from minigpt import _backend, ops, reference  # noqa: E402


# ----------------------------------------------------------------------------- peak memory

def peak_mb(fn, device):
    """Peak memory fn() adds above what is live before it, in MiB (None if not measurable);
    the measurement itself is minigpt.bench's, shared with `minigpt bench train`."""
    from minigpt.bench import step_peak_bytes

    b = step_peak_bytes(fn, device)
    return None if b is None else b / 2**20


# ----------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One op at one size. ``make()`` returns fresh inputs (those needing grad have it);
    ``impls`` maps an implementation name to ``f(*inputs) -> tensor or tuple``. The runner
    adds fwd and fwd+bwd (sum of outputs times a fixed random cotangent) for each."""
    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[], tuple]
    impls: dict = field(default_factory=dict)


def _impls(op, ref_fn, kernel_fn, device):
    """eager, torch.compile of eager, and every kernel backend that runs here (not the Triton
    interpreter: timing it means nothing)."""
    impls = {"eager": ref_fn, "compile": torch.compile(ref_fn, dynamic=False)}
    for be in ("triton", "cuda", "cpu"):
        if _backend.is_available(be, device) and not (be == "triton" and device.type == "cpu"):
            impls[be] = (lambda b: (lambda *a: kernel_fn(*a, backend=b)))(be)
    return impls


def bench_rms_norm(device, quick):
    sizes = ([(4096, 4096), (8192, 8192)] if device.type == "cuda"
             else [(2048, 2048)] if quick else [(2048, 2048), (4096, 4096)])
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    cases = []
    for (M, N) in sizes:
        for dt in dtypes:
            for res in (False, True):
                def make(M=M, N=N, dt=dt, res=res):
                    x = torch.randn(M, N, device=device, dtype=dt, requires_grad=True)
                    w = torch.randn(N, device=device, requires_grad=True)
                    if not res:
                        return x, w
                    return x, w, torch.randn(M, N, device=device, dtype=dt, requires_grad=True)
                ref = lambda x, w, r=None: reference.rms_norm(x, w, 1e-6, r)  # noqa: E731
                ker = lambda x, w, r=None, backend=None: ops.rms_norm(  # noqa: E731
                    x, w, 1e-6, r, backend=backend)
                cases.append(Case("rms_norm+residual" if res else "rms_norm", f"{M}x{N}", dt,
                                  make, _impls("rms_norm", ref, ker, device)))
    return cases


def _tables(L, D, device):
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    f = torch.outer(torch.arange(L, device=device, dtype=torch.float32), inv)
    emb = torch.cat((f, f), -1)
    return emb.cos(), emb.sin()


def bench_rope(device, quick):
    # (B, Hq, Hk, T, D): Llama-style GQA.
    sizes = ([(4, 32, 8, 2048, 128)] if device.type == "cuda"
             else [(2, 16, 4, 512, 64)] if quick else [(2, 16, 4, 512, 64), (4, 32, 8, 512, 128)])
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32]
    cases = []
    for (B, Hq, Hk, T, D) in sizes:
        cos, sin = _tables(T, D, device)
        for dt in dtypes:
            def make(B=B, Hq=Hq, Hk=Hk, T=T, D=D, dt=dt):
                # (B, T, H, D) projections viewed as (B, H, T, D), as a model produces them.
                q = torch.randn(B, T, Hq, D, device=device, dtype=dt).transpose(1, 2)
                k = torch.randn(B, T, Hk, D, device=device, dtype=dt).transpose(1, 2)
                return q.requires_grad_(), k.requires_grad_()
            cases.append(Case("rope", f"B{B} Hq{Hq} Hk{Hk} T{T} D{D}", dt, make, _impls(
                "rope", lambda q, k, c=cos, s=sin: reference.rope(q, k, c, s),
                lambda q, k, backend, c=cos, s=sin: ops.rope(q, k, c, s, backend=backend), device)))
    return cases


def bench_swiglu(device, quick):
    sizes = ([(8192, 14336)] if device.type == "cuda"
             else [(2048, 5632)] if quick else [(2048, 5632), (4096, 11008)])
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32]
    cases = []
    for (M, N) in sizes:
        for dt in dtypes:
            def make(M=M, N=N, dt=dt):
                return (torch.randn(M, N, device=device, dtype=dt, requires_grad=True),
                        torch.randn(M, N, device=device, dtype=dt, requires_grad=True))
            cases.append(Case("swiglu", f"{M}x{N}", dt, make,
                              _impls("swiglu", reference.swiglu, ops.swiglu, device)))
    return cases


def bench_cross_entropy(device, quick):
    # (tokens, vocab): GPT-2 / Llama-2 / Llama-3 vocabularies. The loss alone, from given logits.
    sizes = ([(8192, 32000), (4096, 128256)] if device.type == "cuda"
             else [(1024, 32000)] if quick else [(1024, 32000), (2048, 49152)])
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    cases = []
    for (N, V) in sizes:
        for dt in dtypes:
            def make(N=N, V=V, dt=dt):
                return (torch.randn(N, V, device=device, dtype=dt, requires_grad=True),
                        torch.randint(0, V, (N,), device=device))
            cases.append(Case("cross_entropy", f"{N}x{V}", dt, make, _impls(
                "cross_entropy", reference.cross_entropy, ops.cross_entropy, device)))
    return cases


def bench_fused_linear_cross_entropy(device, quick):
    # (tokens, hidden, vocab): SmolLM2-135M's head (576 -> 49152), and Llama-3-8B's on GPU.
    # eager = hidden @ weight.T in the input dtype, then the fp32 loss (what a model does).
    sizes = ([(8192, 576, 49152), (4096, 4096, 128256)] if device.type == "cuda"
             else [(512, 576, 32000)] if quick else [(512, 576, 32000), (1024, 576, 49152)])
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32]

    def eager(h, w, t):
        return reference.cross_entropy(h @ w.t(), t)

    cases = []
    for (N, Hd, V) in sizes:
        for dt in dtypes:
            def make(N=N, Hd=Hd, V=V, dt=dt):
                return (torch.randn(N, Hd, device=device, dtype=dt, requires_grad=True),
                        (torch.randn(V, Hd, device=device) * Hd ** -0.5).to(dt).requires_grad_(),
                        torch.randint(0, V, (N,), device=device))
            cases.append(Case("fused_linear_cross_entropy", f"{N}x{Hd} -> {V}", dt, make,
                              _impls("fused_linear_cross_entropy", eager,
                                     ops.fused_linear_cross_entropy, device)))
    return cases


OPS = {
    "rms_norm": bench_rms_norm,
    "rope": bench_rope,
    "swiglu": bench_swiglu,
    "cross_entropy": bench_cross_entropy,
    "fused_linear_cross_entropy": bench_fused_linear_cross_entropy,
}


# ----------------------------------------------------------------------------- runner

def _outputs(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def run_case(case, device, budget_s):
    """Rows for every implementation of ``case``, fwd and fwd+bwd: time (all implementations
    timed round-robin by the harness) and peak memory."""
    # A fresh Dynamo cache per case. The cases of an op share one reference function (one code
    # object), and each shape, dtype and grad mode adds a graph to its cache: past Dynamo's
    # recompile limit (8) "compile" silently ran eager, as at 8192x8192 on the H100 (2026-11-26).
    torch._dynamo.reset()
    inputs = case.make()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    cot = [torch.randn_like(o) for o in _outputs(case.impls["eager"](*inputs))]

    def fwd(f):
        def run():
            with torch.no_grad():
                f(*inputs)
        return run

    def fwd_bwd(f):
        def run():
            torch.autograd.grad(_outputs(f(*inputs)), leaves, cot)
        return run

    rows = []
    for mode, wrap in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        fns, notes = {}, {}
        for name, f in case.impls.items():
            fn = wrap(f)
            try:
                fn()  # compiles; a failing implementation becomes a note, not a crash
                fns[name] = fn
            except Exception as e:  # noqa: BLE001
                notes[name] = f"{type(e).__name__}: {str(e)[:100]}"
        ms = H.time_fns(fns, device, budget_s=budget_s)
        kern = H.kernel_ms(fns, device)  # GPU only: time on the GPU, without launch overhead
        mb = {name: peak_mb(fn, device) for name, fn in fns.items()}
        for name in case.impls:
            m, base = mb.get(name), mb.get("eager")
            k, k_eager = kern.get(name), kern.get("eager")
            rows.append(H.row(case.op, case.shape, case.dtype, name, mode,
                              ms.get(name, float("nan")), eager_ms=ms.get("eager"), MB=m,
                              **{"mem x eager": (m / base) if (m is not None and base) else None,
                                 "note": notes.get(name), "kernel ms": k,
                                 "kernel x eager": (k_eager / k) if (k and k_eager) else None}))
    return rows


COLUMNS = ["op", "shape", "dtype", "backend", "pass", "ms", "x eager", "MB", "mem x eager", "note"]
KERNEL_COLUMNS = ["kernel ms", "kernel x eager"]  # GPU: H.kernel_ms, without the per-call overhead

NOTES = """
ms: median time (benchmarks/_harness.py rules: warm-up, then all implementations round-robin).
x eager: eager ms / ms. MB: peak memory (MiB) the call adds above its live inputs (CUDA:
max_memory_allocated; CPU: rise of the peak resident set, VmHWM). mem x eager: MB / eager's MB.
eager = minigpt.reference (plain PyTorch); compile = torch.compile of that same function.
fwd runs under no_grad; fwd+bwd is the forward then autograd.grad of every input.
kernel ms (GPU): the GPU time of one call (torch.profiler: the kernels' summed durations),
without the Python and launch overhead that ms includes; kernel x eager compares those.
Generated by `python benchmarks/bench_training_ops.py`.
"""


def _merge_earlier(rows, device, out_dir, header):
    """The rows of ops this run did not measure, kept from the existing results file (so timing
    one op does not erase the others), then this run's rows; the header says which rows are
    older and when they were measured."""
    import csv

    path = os.path.join(out_dir, f"training_ops_{H.device_tag(device)}.csv")
    if not os.path.exists(path):
        return rows
    meta, lines = {}, []
    with open(path) as f:
        for line in f:
            if line.startswith("# "):
                k, _, v = line[2:].partition(": ")
                meta[k] = v.strip()
            else:
                lines.append(line)
    ran = {r["op"] for r in rows}
    kept = [r for r in csv.DictReader(lines) if r.get("op") and r["op"] not in ran]
    if not kept:
        return rows
    for r in kept:
        for k, v in list(r.items()):
            if k not in ("op", "shape", "dtype", "backend", "pass", "note"):
                try:
                    r[k] = float(v) if v not in ("", None) else None
                except ValueError:
                    pass
            elif v == "":
                r[k] = None
    old_ops = ", ".join(dict.fromkeys(r["op"] for r in kept))
    when = meta.get("date", "an earlier run")
    load = meta.get("load average at start (1/5/15 min)")
    header[f"rows kept from an earlier run ({old_ops})"] = when + (f", load {load}" if load else "")
    return kept + rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=H.device_arg,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="auto, cpu, cuda or cuda:N (default: cuda where torch sees one)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list from {list(OPS)}")
    p.add_argument("--quick", action="store_true", help="one small size per op")
    p.add_argument("--budget", type=float, default=1.0,
                   help="seconds of round-robin timing per case and pass")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    a = p.parse_args(argv)
    device = H.use_device(a.device)
    names = [n.strip() for n in a.ops.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    header = H.env_header(device)
    if device.type == "cpu" and os.path.exists("/proc/loadavg"):
        # CPU timings on a shared machine move with its load: record it beside them.
        with open("/proc/loadavg") as f:
            header["load average at start (1/5/15 min)"] = " ".join(f.read().split()[:3])
    rows = []
    for n in names:
        for case in OPS[n](device, a.quick):
            got = run_case(case, device, a.budget)
            H.print_table(got, COLUMNS + (KERNEL_COLUMNS if device.type == "cuda" else []))
            rows += got
    rows = _merge_earlier(rows, device, a.out, header)
    paths = H.write_results(rows, "training_ops", device, a.out,
                            title="Training ops: kernels vs eager PyTorch and torch.compile",
                            notes=NOTES, header=header)
    print(f"wrote {paths['csv']} and {paths['md']}")


if __name__ == "__main__":
    main()
