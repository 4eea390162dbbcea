"""The loss at a real model's scale: peak memory and time of one training step's loss
(forward + backward), each variant in its own process.

    python benchmarks/bench_loss.py                       # 8192 tokens, hidden 576, vocab 49152
    python benchmarks/bench_loss.py --tokens 2048         # a proportionally smaller run
    python benchmarks/bench_loss.py --device cuda --dtype bf16

The shape is SmolLM2-135M's head (hidden 576 -> vocab 49152) on 8192 tokens, where the issue's
goal is: fused linear cross-entropy uses <= 0.3x the peak memory of eager PyTorch
(``F.cross_entropy(hidden @ weight.T, target)``). Variants:

  fused linear CE: eager, torch.compile(eager), minigpt.ops.fused_linear_cross_entropy with each
                   backend that runs here (on CPU: cpu = C++ kernel per chunk, torch = the same
                   chunk loop on plain torch ops);
  cross-entropy:   eager ``F.cross_entropy(logits)`` (fp32 math), torch.compile, and
                   minigpt.ops.cross_entropy, from given (tokens, vocab) logits.

Each variant runs in a fresh subprocess: build inputs, one warm-up step (compilation, first-touch
page faults), then one measured step: forward, then ``torch.autograd.grad(loss, inputs)`` (what
``loss.backward()`` does; grad_output is 1). Peak memory is what the measured step adds above
the live inputs: on CUDA torch.cuda.max_memory_allocated, on CPU the rise of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs), with glibc told to mmap every
allocation above 64 KiB so freed memory really leaves the process. Results go to
benchmarks/results/loss_<device>.{csv,md} unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
OPS = {"fused": "fused_linear_cross_entropy", "ce": "cross_entropy"}


# ----------------------------------------------------------------------------- one variant


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


def _child(a):
    import ctypes

    import torch
    import torch.nn.functional as F

    import minigpt  # noqa: F401  (settles TRITON_INTERPRET)
    from minigpt import ops

    torch.manual_seed(0)
    import _harness as H

    dev = H.use_device(a.device)
    dt = getattr(torch, DTYPES[a.dtype])
    N, Hd, V = a.tokens, a.hidden, a.vocab
    t = torch.randint(0, V, (N,), device=dev)
    t[::17] = -100  # some ignored positions (padding), as in real batches
    if a.op == "fused":
        h = torch.randn(N, Hd, device=dev, dtype=dt, requires_grad=True)
        w = (torch.randn(V, Hd, device=dev) * Hd ** -0.5).to(dt).requires_grad_()
        inputs = [h, w]

        def eager(h, w):
            return F.cross_entropy((h @ w.t()).float(), t)

        if a.impl == "eager":
            f = eager
        elif a.impl == "compile":
            f = torch.compile(eager)
        else:
            def f(h, w):
                return ops.fused_linear_cross_entropy(h, w, t, backend=a.impl)
    else:
        x = (torch.randn(N, V, device=dev) * 2).to(dt).requires_grad_()
        inputs = [x]

        def eager(x):
            return F.cross_entropy(x.float(), t)

        if a.impl == "eager":
            f = eager
        elif a.impl == "compile":
            f = torch.compile(eager)
        else:
            def f(x):
                return ops.cross_entropy(x, t, backend=a.impl)

    def step():
        loss = f(*inputs)
        grads = torch.autograd.grad(loss, inputs)
        return loss, grads

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    loss, grads = step()  # warm-up
    del grads
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := current RSS
        base = _status("VmRSS")
    t0 = time.perf_counter()
    loss, grads = step()
    sync()
    ms = (time.perf_counter() - t0) * 1e3
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = _status("VmHWM") - base
    print(json.dumps({"ms": ms, "MB": peak / 2**20, "loss": loss.item(),
                      "grad_norms": [g.float().norm().item() for g in grads]}))


# ----------------------------------------------------------------------------- driver


def _run_variant(a, op, impl):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--op", op, "--impl", impl,
           "--tokens", str(a.tokens), "--hidden", str(a.hidden), "--vocab", str(a.vocab),
           "--dtype", a.dtype, "--device", a.device]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"note": (p.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(lines[-1])


def _device_arg(s):
    import _harness as H  # torch with it: only once a --device is given

    return H.device_arg(s)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, type=_device_arg,
                   help="auto, cpu, cuda or cuda:N (default: cuda where torch sees one, else cpu)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list from {', '.join(OPS)}")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="loss", help="results file stem")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--op", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    # Refused before any variant runs: the ops before a misspelt one would have run first
    # (minutes at the default size) and then been lost with it.
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        p.error(f"--ops: unknown {unknown}; choose from {list(OPS)}" if unknown
                else f"--ops: nothing given; choose from {list(OPS)}")
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.child:
        return _child(a)

    import torch

    import _harness as H
    import minigpt  # noqa: F401
    from minigpt import _backend

    dev = H.use_device(a.device)
    kernels = [be for be in ("triton", "cuda", "cpu", "torch")
               if _backend.is_available(be, dev) and not (be == "triton" and dev.type == "cpu")]
    header = H.env_header(dev)  # device, date, versions (and the load average on CPU)
    rows = []
    for op in ops:
        name = OPS[op]
        shape = (f"{a.tokens}x{a.hidden} -> {a.vocab}" if op == "fused"
                 else f"{a.tokens}x{a.vocab}")
        res = {impl: _run_variant(a, op, impl) for impl in ["eager", "compile"] + kernels}
        base = res["eager"]
        for impl, r in res.items():
            rows.append(H.row(name, shape, a.dtype, impl, "fwd+bwd", r.get("ms", float("nan")),
                              eager_ms=base.get("ms"), MB=r.get("MB"),
                              **{"mem x eager": (r["MB"] / base["MB"]) if (
                                  r.get("MB") is not None and base.get("MB")) else None,
                                 "loss": r.get("loss"), "note": r.get("note")}))
            H.print_table(rows[-1:], COLUMNS, header=len(rows) == 1)
    notes = NOTES.format(cmd=" ".join(["python benchmarks/bench_loss.py"] + (argv or sys.argv[1:])))
    paths = H.write_results(rows, a.name, dev, a.out, notes=notes, header=header, columns=COLUMNS,
                            title="Loss at model scale: peak memory and time of forward+backward")
    print(f"wrote {paths['csv']} and {paths['md']}")


COLUMNS = ["op", "shape", "dtype", "backend", "pass", "ms", "x eager", "MB", "mem x eager", "loss",
           "note"]

NOTES = """
One forward+backward step per variant, each in a fresh process after one warm-up step.
MB: peak memory (MiB) the step adds above its live inputs (CUDA: max_memory_allocated; CPU: rise
of the peak resident set). mem x eager: MB / eager's MB. ms: wall time of that one step (on a
shared CPU, a rough figure). eager = F.cross_entropy on fp32 logits (from hidden @ weight.T for
the fused op); compile = torch.compile of the same function; cpu / torch / triton / cuda =
minigpt.ops with that backend. The same loss in every row checks that all computed the same.
Generated by `{cmd}`.
"""


if __name__ == "__main__":
    main()
