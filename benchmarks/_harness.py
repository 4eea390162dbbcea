"""Small shared benchmark harness: timing, machine description, and result tables.

Used by benchmarks/bench_ops.py and the other benchmark scripts. Typical use:

    from benchmarks import _harness as H          # or `import _harness as H` from benchmarks/

    dev = torch.device("cuda")
    ms = H.time_fns({"eager": f0, "mine": f1}, dev)   # {name: median ms}
    rows.append(H.row(op="softmax", shape=(4096, 1024), dtype=torch.float32, backend="mine",
                      pass_="fwd", ms=ms["mine"], nbytes=2 * x.nbytes, eager_ms=ms["eager"]))
    H.print_table(rows)
    H.write_results(rows, "ops", dev, out_dir="benchmarks/results")   # CSV + markdown

Timing rules (the same for every script, so numbers are comparable):
  * every function is warmed up first (compilation, autotuning, allocator caches);
  * the candidates are timed round-robin, one call each per round, and each one's median over
    the rounds is reported: on a shared or throttling machine, load changes then hit every
    candidate alike instead of whichever happened to run during the noisy second; each round
    starts one candidate later, so none always runs right after the same neighbour;
  * on CUDA each call is bracketed by CUDA events after a synchronize, so the time is GPU time
    of that call including its launch overheads, not Python's;
  * GB/s is the minimum traffic the op needs (each input read once, each output written once)
    over the time, so it is comparable with the copy bandwidth of the same device.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch

from minigpt._backend import pick_device

COLUMNS = ["op", "shape", "dtype", "backend", "pass", "ms", "GB/s", "x eager", "% copy"]


# ---------------------------------------------------------------------------------------------
# The machine

def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (Linux), else platform's description."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_arg(s: str) -> str:
    """argparse type of the scripts' --device: auto, cpu, cuda or cuda:N, checked against
    what torch sees (minigpt's one parser), so a wrong one is a usage error before anything
    runs."""
    try:
        pick_device(s, option="")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def use_device(s: str) -> torch.device:
    """The scripts' device, made the process's current CUDA device: CUDA events, the timing's
    synchronize(), side streams and graph captures follow the current device, so timing
    cuda:1 with cuda:0 current would bracket none of its work. Plain "cuda" is the current
    device (set_device refuses a device without an index)."""
    device = pick_device(s, indexed=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def device_tag(device: torch.device) -> str:
    """Short file-name tag for the device kind: 'cpu' or e.g. 'cuda-h100'."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)  # h100, a100, l40s, b200, ...
    slug = m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"cuda-{slug}"


def env_header(device: torch.device) -> Dict[str, str]:
    """What the numbers depend on: device, date, library versions."""
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    info = {
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton_v,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["cuda"] = str(torch.version.cuda)
    else:
        info["threads"] = str(torch.get_num_threads())
        load = load_average()
        if load:
            info["load average at start"] = f"{load} (on {os.cpu_count()} CPUs)"
    return info


# ---------------------------------------------------------------------------------------------
# Timing

def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable, device: torch.device) -> float:
    """One call's time in ms."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_fns_stats(fns: Dict[str, Callable], device: torch.device, warmup: int = 3,
                   reps: Optional[int] = None, budget_s: float = 2.0,
                   max_reps: int = 200) -> Dict[str, dict]:
    """{name: {"median": ms, "min": ms, "reps": n, "samples": [ms of each round]}} of each
    function, timed round-robin (see the module docstring); the samples are in round order, so
    two functions' i-th samples ran in the same round (for a difference of the two taken round
    by round). ``reps``: rounds to run; None picks as many as fit ``budget_s`` (between 5 and
    ``max_reps``) from the warm-up times."""
    warm = {}
    for name, fn in fns.items():
        for _ in range(max(warmup - 1, 0)):
            fn()
        sync(device)
        warm[name] = _time_once(fn, device)
    if reps is None:
        per_round = max(sum(warm.values()), 1e-3) / 1e3
        reps = int(min(max_reps, max(5, budget_s / per_round)))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        # Each round starts with the next candidate: what a call leaves behind (its freed
        # output, the caches it filled) changes the next call's time by up to ~10% on a CPU,
        # and a fixed order would hand that to the same candidate every round.
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(_time_once(fns[name], device))
    return {name: {"median": statistics.median(v), "min": min(v), "reps": len(v), "samples": v}
            for name, v in samples.items()}


def device_us(events, device_type) -> float:
    """Summed duration (us) of the profiler events that ran on ``device_type`` (a
    torch.autograd.DeviceType): on CUDA, every kernel, memset and device copy."""
    return sum(e.time_range.elapsed_us() for e in events if e.device_type == device_type)


def profiled_events(fn: Callable, device: torch.device, iters: int):
    """torch.profiler's events of ``iters`` calls of ``fn`` after one untimed call, the device
    synchronized before and after."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync(device)
    return prof.events()


def kernel_ms(fns: Dict[str, Callable], device: torch.device, iters: int = 10
              ) -> Dict[str, Optional[float]]:
    """{name: GPU time per call in ms}: the summed durations of what one call runs on the GPU
    (torch.profiler), without the host time between launches. A per-call timing (CUDA events
    around one call) includes the Python and launch overhead, tens of microseconds, which
    swamps a 5 us row kernel; this is the number a kernel's bandwidth is judged on. {} off
    CUDA; None for a function the profiler could not measure (the timing still stands)."""
    if device.type != "cuda":
        return {}
    from torch.autograd import DeviceType

    out: Dict[str, Optional[float]] = {}
    for name, fn in fns.items():
        try:
            us = device_us(profiled_events(fn, device, iters), DeviceType.CUDA)
            out[name] = us / iters / 1e3 if us > 0 else None
        except Exception as e:  # an extra column: never the reason a benchmark run fails
            print(f"  (kernel time of {name} not measured: {type(e).__name__}: {e})", flush=True)
            out[name] = None
    return out


def time_fns(fns: Dict[str, Callable], device: torch.device, warmup: int = 3,
             reps: Optional[int] = None, budget_s: float = 2.0,
             max_reps: int = 200) -> Dict[str, float]:
    """Median ms of each function, timed round-robin (see the module docstring)."""
    stats = time_fns_stats(fns, device, warmup, reps, budget_s, max_reps)
    return {name: s["median"] for name, s in stats.items()}


def load_average() -> Optional[str]:
    """1/5/15-minute load average (Unix): other work on the machine inflates CPU timings."""
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Rows and tables

def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.float64: "fp64"}.get(dtype, str(dtype).replace("torch.", ""))


def row(op: str, shape, dtype, backend: str, pass_: str, ms: float, nbytes: Optional[int] = None,
        eager_ms: Optional[float] = None, copy_gbps: Optional[float] = None, **extra) -> dict:
    """One result. ``nbytes``: minimum bytes the op moves (for GB/s); ``eager_ms``: the
    baseline's time (for "x eager" = eager_ms / ms, > 1 is faster than eager); ``copy_gbps``:
    the device's measured copy bandwidth (for "% copy")."""
    gbps = nbytes / (ms * 1e-3) / 1e9 if (nbytes and ms > 0) else None
    r = {
        "op": op,
        "shape": "x".join(str(s) for s in shape) if not isinstance(shape, str) else shape,
        "dtype": dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype),
        "backend": backend,
        "pass": pass_,
        "ms": ms,
        "GB/s": gbps,
        "x eager": (eager_ms / ms) if (eager_ms and ms > 0) else None,
        "% copy": (100.0 * gbps / copy_gbps) if (gbps and copy_gbps) else None,
    }
    r.update(extra)
    return r


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v >= 100:
            return f"{v:.0f}"
        if v >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}" if v < 1 else f"{v:.2f}"
    return str(v)


def columns_of(rows: Iterable[dict], columns: Optional[List[str]] = None) -> List[str]:
    """``columns`` (default COLUMNS, then any extra keys the rows carry), without the ones no
    row filled in (e.g. "% copy" where copy bandwidth was not measured)."""
    rows = list(rows)
    cols = list(columns) if columns else list(COLUMNS) + sorted(
        {k for r in rows for k in r} - set(COLUMNS))
    return [c for c in cols if any(r.get(c) is not None for r in rows)]


def markdown_table(rows: List[dict], columns: Optional[List[str]] = None,
                   header: bool = True) -> str:
    """Rows as a markdown table. With explicit ``columns`` exactly those are printed (so
    tables printed piece by piece line up); ``header=False`` leaves out the two header lines."""
    cols = list(columns) if columns else columns_of(rows)
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    out = out if header else []
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def print_table(rows: List[dict], columns: Optional[List[str]] = None, header: bool = True):
    print(markdown_table(rows, columns, header), flush=True)


def header_markdown(header: Dict[str, str], title: str) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    return "\n".join(lines) + "\n"


def write_results(rows: List[dict], name: str, device: torch.device, out_dir: str,
                  title: Optional[str] = None, notes: str = "",
                  header: Optional[Dict[str, str]] = None,
                  columns: Optional[List[str]] = None,
                  tag: Optional[str] = None) -> Dict[str, str]:
    """Write ``<out_dir>/<name>_<device tag>.csv`` and ``.md``; returns their paths.

    The CSV starts with ``# key: value`` lines (device, date, versions), then a header row.
    ``columns``: which to write (default: COLUMNS and any extra keys, less unfilled ones).
    ``tag``: the file-name tag, for results measured on another device (default: ``device``'s).
    """
    os.makedirs(out_dir, exist_ok=True)
    header = header or env_header(device)
    base = os.path.join(out_dir, f"{name}_{tag or device_tag(device)}")
    cols = columns_of(rows, columns)
    with open(base + ".csv", "w", newline="") as f:
        for k, v in header.items():
            f.write(f"# {k}: {v}\n")
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else (f"{r[c]:.6g}" if isinstance(r[c], float)
                                                     else r[c]) for c in cols])
    with open(base + ".md", "w") as f:
        f.write(header_markdown(header, title or f"{name} benchmark"))
        if notes:
            f.write("\n" + notes.strip() + "\n")
        f.write("\n" + markdown_table(rows, cols) + "\n")
    return {"csv": base + ".csv", "md": base + ".md"}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(plt, fig, path: str, title: str = "") -> str:
    """The end the scripts' plots share: the title on top, written to ``path`` as a PNG."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bandwidth(rows: List[dict], path: str, title: str = "") -> Optional[str]:
    """GB/s against problem size, one panel per (op, pass), one line per backend (and dtype
    when there are several). Returns the path, or None if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    rows = [r for r in rows if r.get("GB/s")]
    panels = sorted({(r["op"], r["pass"]) for r in rows})
    if not panels:
        return None
    dtypes = {r["dtype"] for r in rows}
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.6 * nrow), squeeze=False)
    for ax, (op, ps) in zip(axes.flat, panels):
        sub = [r for r in rows if r["op"] == op and r["pass"] == ps]
        lines = sorted({(r["backend"], r["dtype"]) for r in sub})
        for be, dt in lines:
            pts = sorted((_numel(r["shape"]), r["GB/s"]) for r in sub
                         if r["backend"] == be and r["dtype"] == dt)
            label = be if len(dtypes) == 1 else f"{be} {dt}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{op} {ps}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save_png(plt, fig, path, title)


def _numel(shape: str) -> int:
    n = 1
    for s in shape.split("x"):
        n *= int(s)
    return n
