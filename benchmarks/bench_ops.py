"""Time MiniGPT's LayerNorm, fused add + LayerNorm and softmax against eager PyTorch and
torch.compile, forward and forward+backward.

    python benchmarks/bench_ops.py [--device cpu|cuda|cuda:N] [--quick] [--out benchmarks/results]

Prints a markdown table (op, shape, dtype, backend, pass, ms, GB/s, x eager, % copy) and writes
``<out>/ops_<device>.csv``, ``.md`` and ``.png`` (GB/s against size). Baselines:
``eager`` is plain PyTorch (F.layer_norm; x + r then F.layer_norm; torch.softmax) and
``compile`` is torch.compile of that same eager function. Our backends are every one available
on the device, except Triton on CPU: there it runs in its interpreter, a correctness tool, not a
speed path. ``% copy`` compares with the measured bandwidth of ``x.clone()`` of the same size.
GB/s counts the minimum traffic: forward reads x (and r) and writes y (and h); backward reads
dy (and dh) and the saved activation and writes dx. ``ms`` is the median over round-robin
rounds, ``min ms`` the fastest round (on a busy shared machine the median carries the load,
the minimum much less); timing rules: benchmarks/_harness.py. On a GPU, ``kernel ms`` is one
call's GPU time by torch.profiler (its kernels' summed durations, no Python or launch
overhead), with ``kernel x eager`` and ``kernel % copy`` (against the copy's kernel time) from
it: at 4096 x 1024 a row kernel is ~5 us and the per-call ``ms`` is mostly overhead.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import _harness as H  # noqa: E402

import minigpt  # noqa: E402,F401  (settles TRITON_INTERPRET before triton is imported)
from minigpt import _backend, ops  # noqa: E402

OPS = ("layer_norm", "add_layer_norm", "softmax")

# (rows, cols, dtype). CPU: the goal shape 4096x1024 fp32 plus a smaller and a larger one for
# the bandwidth plot, and bf16 and fp16 once. GPU: fp32 and bf16, up to sizes far beyond the L2 cache.
SHAPES = {
    ("cpu", False): [(1024, 1024, torch.float32), (4096, 1024, torch.float32),
                     (4096, 4096, torch.float32), (4096, 1024, torch.bfloat16),
                     (4096, 1024, torch.float16)],
    ("cpu", True): [(4096, 1024, torch.float32)],
    ("cuda", False): [(m, n, dt) for dt in (torch.bfloat16, torch.float32)
                      for m, n in ((4096, 1024), (16384, 1024), (8192, 4096), (16384, 8192),
                                   (4096, 65536))],
    ("cuda", True): [(m, n, dt) for dt in (torch.bfloat16, torch.float32)
                     for m, n in ((4096, 1024), (16384, 8192))],
}


def our_backends(device: torch.device) -> list[str]:
    out = []
    for be in ("triton", "cuda", "cpu"):
        if be == "triton" and device.type == "cpu":
            continue  # the interpreter: see the module docstring
        if _backend.is_available(be, device):
            out.append(be)
    return out


def make_case(op: str, M: int, N: int, dtype, device, grad: bool):
    """-> (inputs, eager fn, {backend: fn}, bytes moved, grad targets, grad outputs)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    es = torch.empty((), dtype=dtype).element_size()
    numel = M * N
    x = rnd(M, N)
    if op == "softmax":
        inputs = [x]

        def eager(x):
            return (torch.softmax(x, -1),)

        def ours(be):
            return lambda x: (ops.softmax(x, backend=be),)

        fwd_bytes, bwd_bytes = 2 * numel * es, 3 * numel * es
    else:
        w, b = rnd(N, scale=0.5), rnd(N, scale=0.1)
        with torch.no_grad():
            w += 1
        if op == "layer_norm":
            inputs = [x, w, b]

            def eager(x, w, b):
                return (F.layer_norm(x, (N,), w, b),)

            def ours(be):
                return lambda x, w, b: (ops.layer_norm(x, w, b, backend=be),)

            fwd_bytes, bwd_bytes = 2 * numel * es, 3 * numel * es
        else:
            r = rnd(M, N)
            inputs = [x, r, w, b]

            def eager(x, r, w, b):
                h = x + r
                return F.layer_norm(h, (N,), w, b), h

            def ours(be):
                return lambda x, r, w, b: ops.layer_norm(x, w, b, residual=r, backend=be)

            fwd_bytes, bwd_bytes = 4 * numel * es, 4 * numel * es
    return inputs, eager, ours, fwd_bytes, bwd_bytes


# The CUDA LayerNorm backward at fp32 rows of 4097 to 8192 keeps its dweight/dbias sums in
# registers (one block an SM); with the environment variable below, in shared memory (two
# blocks an SM), the kernel that was the default for a day and lost to the register one on an
# H100. --cuda-ln-sums times that one too, as this backend.
SMEMSUMS, SMEMSUMS_ENV = "cuda-smemsums", "MINIGPT_CUDA_LN_BWD_SUMS"


def _smemsums_applies(op, N, dtype, backends) -> bool:
    return "cuda" in backends and op != "softmax" and dtype == torch.float32 and 4096 < N <= 8192


def _with_shared_sums(call):
    def run():
        old = os.environ.get(SMEMSUMS_ENV)
        os.environ[SMEMSUMS_ENV] = "shared"  # read by the launcher at each launch
        try:
            return call()
        finally:
            if old is None:
                os.environ.pop(SMEMSUMS_ENV)
            else:
                os.environ[SMEMSUMS_ENV] = old
    return run


def bench_case(op, M, N, dtype, device, pass_, backends, use_compile, budget_s,
               smemsums=False):
    grad = pass_ == "fwd+bwd"
    inputs, eager, ours, fwd_bytes, bwd_bytes = make_case(op, M, N, dtype, device, grad)
    fns = {"eager": eager}
    if use_compile:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limits, no stale guards
        fns["compile"] = torch.compile(eager, dynamic=False)
    for be in backends:
        fns[be] = ours(be)
    if smemsums and grad and _smemsums_applies(op, N, dtype, backends):
        fns[SMEMSUMS] = ours("cuda")
    calls = {}
    if grad:
        outs_shape = [o.shape for o in eager(*inputs)]
        gouts = [torch.randn(s, device=device, dtype=dtype) for s in outs_shape]
        for name, fn in fns.items():
            calls[name] = (lambda fn=fn: torch.autograd.grad(fn(*inputs), inputs, gouts))
        if SMEMSUMS in calls:
            calls[SMEMSUMS] = _with_shared_sums(calls[SMEMSUMS])
        nbytes = fwd_bytes + bwd_bytes
    else:
        for name, fn in fns.items():
            calls[name] = (lambda fn=fn: fn(*inputs))
        nbytes = fwd_bytes
        x = inputs[0].detach()
        calls["copy"] = lambda: x.clone()
    with torch.no_grad() if not grad else torch.enable_grad():
        stats = H.time_fns_stats(calls, device, budget_s=budget_s)
        kern = H.kernel_ms(calls, device)
    for name, ms in kern.items():
        if name in stats:
            stats[name]["kernel"] = ms
    copy_gbps = copy_kernel_gbps = None
    if "copy" in stats:
        copy_bytes = 2 * inputs[0].numel() * inputs[0].element_size()
        copy = stats.pop("copy")
        copy_gbps = copy_bytes / (copy["median"] * 1e-3) / 1e9
        if copy.get("kernel"):
            copy_kernel_gbps = copy_bytes / (copy["kernel"] * 1e-3) / 1e9
    return stats, nbytes, (copy_gbps, copy_kernel_gbps)


def kernels_only(rows: int = 512, N: int = 1024, reps: int = 1000) -> list[dict]:
    """The C++ kernels alone against the ATen kernels eager PyTorch runs (no Python wrapper,
    no autograd), one thread, fastest of ``reps`` round-robin runs on a (rows, N) fp32 slice
    small enough to finish between the preemptions of a busy machine."""
    import time

    C = _backend.extension()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, r, dy = (torch.randn(rows, N, generator=g) for _ in range(3))
    w, b = torch.randn(N, generator=g) + 1, torch.randn(N, generator=g)
    y = torch.softmax(x, -1)
    _, _, mu, rs = C.layer_norm_fwd(x, w, b, None, 1e-5)
    aten = torch.ops.aten
    pairs = {
        "softmax fwd": (lambda: torch.softmax(x, -1), lambda: C.softmax_fwd(x, 1.0, False, 1)),
        "softmax bwd": (lambda: aten._softmax_backward_data(dy, y, -1, torch.float32),
                        lambda: C.softmax_bwd(dy, y, 1.0)),
        "layer_norm fwd": (lambda: aten.native_layer_norm(x, (N,), w, b, 1e-5),
                           lambda: C.layer_norm_fwd(x, w, b, None, 1e-5)),
        "add + layer_norm fwd": (lambda: aten.native_layer_norm(x + r, (N,), w, b, 1e-5),
                                 lambda: C.layer_norm_fwd(x, w, b, r, 1e-5)),
        "layer_norm bwd": (lambda: aten.native_layer_norm_backward(
            dy, x, (N,), mu.view(-1, 1), rs.view(-1, 1), w, b, [True, True, True]),
            lambda: C.layer_norm_bwd(dy, None, x, w, mu, rs, True, False)),
    }
    best = {(k, i): float("inf") for k in pairs for i in (0, 1)}
    for _ in range(reps):
        for k, fns in pairs.items():
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                best[(k, i)] = min(best[(k, i)], (time.perf_counter() - t0) * 1e3)
    return [H.row(k, (rows, N), torch.float32, "cpu (kernel only)", "", best[(k, 1)],
                  eager_ms=best[(k, 0)], **{"eager ms": best[(k, 0)]}) for k in pairs]


# GPU only: the same quantities by kernel time (H.kernel_ms), without the per-call overhead.
KERNEL_COLUMNS = ["kernel ms", "kernel x eager", "kernel % copy"]


def kernel_fields(ms, eager_ms, nbytes, copy_gbps) -> dict:
    if not ms:
        return {}
    out = {"kernel ms": ms}
    if eager_ms:
        out["kernel x eager"] = eager_ms / ms
    if copy_gbps:
        out["kernel % copy"] = 100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbps
    return out


def check_goals(rows, device) -> list[str]:
    """The issue's goals, each as a line 'PASS/MISS: ...'."""
    lines = []

    def find(op, shape, dtype, be, ps):
        for r in rows:
            if (r["op"], r["shape"], r["dtype"], r["backend"], r["pass"]) == (op, shape, dtype,
                                                                                  be, ps):
                return r
        return None

    if device.type == "cpu":
        for op in OPS:
            for ps in ("fwd", "fwd+bwd"):
                r = find(op, "4096x1024", "fp32", "cpu", ps)
                e = find(op, "4096x1024", "fp32", "eager", ps)
                if r is None or e is None:
                    continue
                ok = r["x eager"] >= 1.0
                what = ("fused add+layer_norm beats eager add + F.layer_norm" if op ==
                        "add_layer_norm" else f"C++ {op} not slower than eager")
                lines.append(f"{'PASS' if ok else 'MISS'}: {what}, 4096x1024 fp32 {ps}: "
                             f"{r['x eager']:.2f}x eager by median ({r['ms']:.3f} vs "
                             f"{e['ms']:.3f} ms), {e['min ms'] / r['min ms']:.2f}x by fastest "
                             f"round ({r['min ms']:.3f} vs {e['min ms']:.3f} ms)")
    else:
        for r in rows:
            if r["backend"] not in ("triton", "cuda"):
                continue
            # Per call (what a caller waits for) and, where measured, by kernel time, which
            # decides: a bandwidth and a kernel-against-kernel ratio are the goals' terms, and
            # at 4096 x 1024 a synchronized call is mostly Python and launch time (~5 us of
            # GPU work against 30-90 us of host time a call on the H200).
            k_copy, k_x = r.get("kernel % copy"), r.get("kernel x eager")
            if r["pass"] == "fwd" and r.get("% copy") is not None:
                ok = (k_copy if k_copy else r["% copy"]) >= 85
                by_kernel = f"; {k_copy:.0f}% by kernel time" if k_copy else ""
                lines.append(f"{'PASS' if ok else 'MISS'}: {r['backend']} {r['op']} fwd "
                             f"{r['shape']} {r['dtype']}: {r['% copy']:.0f}% of copy bandwidth "
                             f"per call{by_kernel} (goal >= 85%)")
            if r["pass"] == "fwd+bwd":
                ok = (k_x if k_x else r["x eager"]) >= 1.5
                by_kernel = f"; {k_x:.2f}x by kernel time" if k_x else ""
                lines.append(f"{'PASS' if ok else 'MISS'}: {r['backend']} {r['op']} fwd+bwd "
                             f"{r['shape']} {r['dtype']}: {r['x eager']:.2f}x eager per call"
                             f"{by_kernel} (goal >= 1.5x)")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=H.device_arg,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="auto, cpu, cuda or cuda:N (default: cuda where torch sees one)")
    p.add_argument("--quick", action="store_true", help="one or two shapes, for a smoke run")
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="folder for ops_<device>.csv/.md/.png ('' to write nothing)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--kernels", action="store_true",
                   help="CPU: time only the C++ kernels against ATen's (one thread, fastest of "
                        "1000 runs on a 512-row slice) and print a table; writes nothing")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of round-robin timing per case (default 3 on CPU, 1 on GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every backend (torch.set_num_threads; default: torch's)")
    p.add_argument("--cuda-ln-sums", action="store_true",
                   help=f"also time the CUDA LayerNorm backward with its dweight/dbias sums in "
                        f"shared memory ({SMEMSUMS_ENV}=shared) as backend {SMEMSUMS!r}, where "
                        "it differs (fp32 rows of 4097 to 8192)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = H.use_device(args.device)
    if args.budget is None:
        args.budget = 3.0 if device.type == "cpu" else 1.0
    if args.kernels:
        if device.type != "cpu":
            p.error("--kernels times the C++ CPU kernels; use it with --device cpu")
        H.print_table(kernels_only(), ["op", "shape", "dtype", "backend", "eager ms", "ms",
                                       "x eager"])
        return
    backends = our_backends(device)
    header = H.env_header(device)
    notes = []
    if device.type == "cpu":
        notes.append("Triton is not timed on CPU: it runs there in its interpreter, which checks "
                     "correctness and is not a speed path.")
    missing = [b for b in ("cuda", "cpu") if (b == device.type and b not in backends)]
    if missing:
        notes.append(f"not available here: {missing} ({_backend._unavailable_reason(missing[0], device)})")
    for k, v in header.items():
        print(f"{k}: {v}")
    for n in notes:
        print(f"note: {n}")
    print(f"backends: eager, {'compile, ' if not args.no_compile else ''}{', '.join(backends)}\n",
          flush=True)

    rows = []
    want = [o.strip() for o in args.ops.split(",") if o.strip()]
    for op in want:
        if op not in OPS:
            p.error(f"unknown op {op!r}; choose from {OPS}")
    cols = [c for c in H.COLUMNS if c != "% copy" or device.type == "cuda"] + ["min ms"]
    if device.type == "cuda":
        cols += KERNEL_COLUMNS
    copy_bw = {}  # (M, N, dtype) -> GB/s of x.clone() (per call, by kernel time), per forward
    for M, N, dtype in SHAPES[(device.type, args.quick)]:
        for op in want:
            for ps in ("fwd", "fwd+bwd"):
                st, nbytes, copy_bws = bench_case(op, M, N, dtype, device, ps, backends,
                                                  not args.no_compile, args.budget,
                                                  args.cuda_ln_sums)
                if copy_bws[0]:
                    copy_bw[(M, N, dtype)] = copy_bws
                bw, kbw = copy_bw.get((M, N, dtype), (None, None))
                new = [H.row(op, (M, N), dtype, be, ps, t["median"], nbytes=nbytes,
                             eager_ms=st["eager"]["median"], copy_gbps=bw,
                             **{"min ms": t["min"]},
                             **kernel_fields(t.get("kernel"), st["eager"].get("kernel"), nbytes,
                                             kbw))
                       for be, t in st.items()]
                H.print_table(new, cols, header=not rows)
                rows += new

    goals = check_goals(rows, device)
    print()
    for line in goals:
        print(line)
    if args.out:
        goal_md = "\n".join(f"- {g}" for g in goals)
        head = "Goals" + (" (PASS/MISS by kernel time where it was measured)"
                          if device.type == "cuda" else "")
        text = "\n\n".join(notes + ([f"{head}:\n\n{goal_md}"] if goals else []))
        if device.type == "cpu":  # "% copy" is a GPU goal; on CPU it only adds noise
            for r in rows:
                r.pop("% copy", None)
        paths = H.write_results(rows, "ops", device, args.out,
                                title="MiniGPT ops: LayerNorm, add + LayerNorm, softmax",
                                notes=text, header=header)
        png = H.plot_bandwidth(rows, os.path.join(args.out, f"ops_{H.device_tag(device)}.png"),
                               title=f"{header['device']} - torch {header['torch']}")
        print("\nwrote " + ", ".join(list(paths.values()) + ([png] if png else [])))


if __name__ == "__main__":
    main()
