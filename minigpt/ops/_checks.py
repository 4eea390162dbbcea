"""Input checks shared by every public op: a bad input gets a message naming the problem,
never a crash inside a kernel."""
from __future__ import annotations

import contextlib
import math
import numbers
import threading

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(op: str, name: str, t, *, float_=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if float_ and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (float32, float16, bfloat16 or "
                        f"float64), got {t.dtype}")
    return t


def nonempty_last_dim(op: str, name: str, t: torch.Tensor):
    if t.dim() == 0:
        raise ValueError(f"{op}: {name} must have at least one dimension, got a scalar")
    if t.shape[-1] == 0:
        raise ValueError(f"{op}: {name} has an empty last dimension (shape {tuple(t.shape)})")


def same_device(op: str, **tensors):
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(f"{op}: {k} is on {v.device} but {items[0][0]} is on {dev}; "
                             "move them to the same device")


def same_dtype(op: str, **tensors):
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dt = items[0][1].dtype
    for k, v in items[1:]:
        if v.dtype != dt:
            raise TypeError(f"{op}: {k} has dtype {v.dtype} but {items[0][0]} has {dt}")


def shape(op: str, name: str, t: torch.Tensor, expected: tuple):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def eps(op: str, value):
    """A norm's epsilon: a finite number >= 0 (NaN or inf would turn every output into NaN or
    zero without a word), as a Python float (numpy scalars included: the kernels take a float)."""
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{op}: eps must be a finite non-negative number, got {value!r}")
    return float(value)


def scale_range(op: str, value, dtype: torch.dtype):
    """A finite ``scale`` that every backend can hold: all of them compute in float32 for
    every input dtype but float64 (which only the reference and the C++ kernels take, both
    computing in float64 with the scale as given). A Python float past float32's range became
    inf there, and each backend made its own NaNs and one-hot rows of inf * x."""
    if dtype == torch.float64:
        return
    limit = torch.finfo(torch.float32).max
    if abs(value) > limit:
        raise ValueError(f"{op}: |scale| must be at most {limit:.6g}, float32's largest value "
                         f"(the backends take scale as a float32 for {dtype} inputs), got "
                         f"{value!r}; float64 inputs take any finite scale")


def out_dtype(op: str, value):
    if value is not None and value not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be None or a floating dtype (float32, float16, "
                        f"bfloat16 or float64), got {value!r}")


# ----------------------------------------------------------------------------------------------
# Checks that read tensor values on the host

_state = threading.local()


@contextlib.contextmanager
def no_host_sync():
    """Skip the input checks that read tensor values on the host inside this block.

    A target of a cross-entropy or a token id of the model outside its range, or a decode cache
    length, can only be checked by reading the tensor: on a GPU, a host sync, which stalls the
    launch queue (the GPU idles until the host has queued the next kernels) and is not allowed
    at all while a CUDA graph is captured. The checks are skipped there by themselves; this
    block skips them too, e.g. around a training step whose inputs are known to be in range.
    Nothing reads out of bounds without them: an out-of-range target gives a NaN loss, an
    out-of-range token id the embedding's own error (a device-side assert on CUDA).
    """
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def host_checks(t: torch.Tensor) -> bool:
    """Whether a check that reads ``t``'s values on the host may run now: not while
    torch.compile traces, not while a CUDA graph is being captured, not inside
    ``no_host_sync()``, not for a tensor that has no values to read (a meta tensor), not
    under a torch.func transform (vmap's batched tensors have none either)."""
    if torch.compiler.is_compiling():
        return False
    if getattr(_state, "depth", 0):
        return False
    # Reading either failed with torch's internal "Cannot copy out of meta tensor" or
    # "Cannot access data pointer", which named neither the op nor the cause.
    if t.is_meta:
        return False
    # Under any torch.func transform, not only for the tensors it wraps: torch 2.5 refused
    # even a plain tensor's .tolist() inside jvp and grad ("Cannot access data pointer").
    if functorch_level() is not None:
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


# None outside torch.func transforms (present since torch 2.0; a stand-in where it is not).
functorch_level = getattr(torch._C._functorch, "maybe_current_level", lambda: None)
