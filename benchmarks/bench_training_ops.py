"""Training-op benchmarks: each op's kernel backends against eager PyTorch (the reference) and
torch.compile of the reference, forward and forward+backward, time and peak memory.

    python benchmarks/bench_training_ops.py                  # this machine's device, all ops
    python benchmarks/bench_training_ops.py --ops rms_norm --quick
    python benchmarks/bench_training_ops.py --device cuda --out benchmarks/results/training_ops_h100

Results go to ``<out>.csv`` and ``<out>.md`` (default benchmarks/results/training_ops_<device>).
Peak memory is what a call adds on top of its inputs: on CUDA torch.cuda.max_memory_allocated,
on CPU the rise of the process's peak resident set (VmHWM, reset per measurement; large
allocations are forced onto mmap so freed memory leaves the process and a peak cannot hide in
memory malloc kept from an earlier call).

Each op is one ``bench_<op>(device, quick)`` function registered in OPS that returns Cases;
add an op by writing one more such function (structure: see ``Case``).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and (
        sys.platform.startswith("linux")):
    # A fixed mmap threshold (glibc reads it at start-up only, hence the re-exec) sends every
    # tensor above 64 KiB straight to mmap/munmap, so the CPU peak-RSS measurement sees them.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import minigpt  # noqa: E402,F401  (sets TRITON_INTERPRET on machines without a GPU)
from minigpt import _backend, ops, reference  # noqa: E402


# ----------------------------------------------------------------------------- measurement

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, min_time=0.3, warmup=2, max_reps=200):
    """Median wall time of fn() in ms over as many repeats as fit in ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def peak_mb(fn, device):
    """Peak memory fn() adds above what is live before it, in MB (None if not measurable)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if _LIBC is None or _rss("VmHWM") is None:
        return None
    _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    base = _rss("VmRSS")
    fn()
    return max(0, _rss("VmHWM") - base) / 2**20


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


OPS = {
    "rms_norm": bench_rms_norm,
    "rope": bench_rope,
    "swiglu": bench_swiglu,
}


# ----------------------------------------------------------------------------- runner

def _outputs(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def run_case(case, device, min_time):
    rows = []
    inputs = case.make()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    cot = [torch.randn_like(o) for o in _outputs(case.impls["eager"](*inputs))]
    for name, f in case.impls.items():
        def fwd():
            with torch.no_grad():
                f(*inputs)

        def fwd_bwd():
            outs = _outputs(f(*inputs))
            torch.autograd.grad(outs, leaves, cot)

        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            try:
                t = time_ms(fn, device, min_time)
                m = peak_mb(fn, device)
            except Exception as e:  # a failing implementation is a row, not a crash
                rows.append(dict(op=case.op, shape=case.shape, dtype=str(case.dtype)[6:],
                                 impl=name, mode=mode, ms=float("nan"), mb=None,
                                 note=f"{type(e).__name__}: {str(e)[:80]}"))
                continue
            rows.append(dict(op=case.op, shape=case.shape, dtype=str(case.dtype)[6:], impl=name,
                             mode=mode, ms=t, mb=m, note=""))
    for r in rows:
        base = next(b for b in rows if b["impl"] == "eager" and b["mode"] == r["mode"])
        r["speedup"] = base["ms"] / r["ms"] if r["ms"] == r["ms"] and r["ms"] > 0 else float("nan")
        r["mem_vs_eager"] = (r["mb"] / base["mb"] if r["mb"] is not None and base["mb"]
                             else float("nan"))
    return rows


def device_tag(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def header(device):
    import triton

    return {"device": device_tag(device),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}


COLS = ["op", "shape", "dtype", "impl", "mode", "ms", "speedup", "mb", "mem_vs_eager", "note"]


def _fmt(v):
    if isinstance(v, float):
        return "" if v != v else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def write(rows, meta, out):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".csv", "w") as f:
        for k, v in meta.items():
            f.write(f"# {k}: {v}\n")
        f.write(",".join(COLS) + "\n")
        for r in rows:
            f.write(",".join(_fmt(r[c]).replace(",", ";") for c in COLS) + "\n")
    with open(out + ".md", "w") as f:
        f.write("# Training ops: kernels vs eager PyTorch and torch.compile\n\n")
        for k, v in meta.items():
            f.write(f"- {k}: {v}\n")
        f.write("\nms: median wall time; speedup: eager ms / ms; MB: peak memory the call adds "
                "above its inputs; mem_vs_eager: MB / eager MB. Generated by "
                "`benchmarks/bench_training_ops.py`.\n\n")
        names = ["op", "shape", "dtype", "impl", "mode", "ms", "speedup", "MB", "mem vs eager",
                 "note"]
        f.write("| " + " | ".join(names) + " |\n|" + "---|" * len(names) + "\n")
        for r in rows:
            f.write("| " + " | ".join(_fmt(r[c]) for c in COLS) + " |\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list from {list(OPS)}")
    p.add_argument("--quick", action="store_true", help="one small size per op")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per row")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    names = [n.strip() for n in a.ops.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    rows = []
    for n in names:
        for case in OPS[n](device, a.quick):
            got = run_case(case, device, a.min_time)
            for r in got:
                print(" ".join(f"{c}={_fmt(r[c])}" for c in COLS if r[c] not in ("", None)),
                      flush=True)
            rows += got
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"training_ops_{device.type}")
    write(rows, header(device), out)
    print(f"wrote {out}.csv and {out}.md")


if __name__ == "__main__":
    main()
