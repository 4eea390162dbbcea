"""softmax: the one dispatch point for softmax(scale * x) over the last dim, optionally causal.

Backends: kernels/softmax.py (triton), csrc/softmax_cuda.cu (cuda), csrc/softmax.cpp (cpu),
minigpt/reference/softmax.py (torch). The kernel backends go through the custom ops
``minigpt::softmax_fwd`` / ``minigpt::softmax_bwd`` so torch.compile sees one opaque node
with a known output shape instead of tracing into Triton or C++.

Kernels see x as (M, N) rows. With ``causal`` the rows come from (..., T, S) = (..., T, N), so
row r is query i = r % T and keeps the first ``clamp(i + S - T + 1, 0, S)`` columns; the rest
are zero, and a row with nothing kept (only when T > S) is all zeros, like the reference.
Backward needs only the output: dx = scale * y * (dy - sum(dy * y)); masked entries have
y == 0, so they get no gradient without the kernel knowing about the mask.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from minigpt import _backend, reference
from minigpt.ops import _checks
from minigpt.ops._eager import bwd_op, eager_function, pick, rows, shaped

OP = "softmax"


def _kernel_fwd(backend, x, scale, causal, T):
    if backend == "triton":
        from minigpt.kernels import softmax as k

        return k.softmax_fwd(x, scale, causal, T)
    return _backend.extension().softmax_fwd(x, scale, causal, T)


def _kernel_bwd(backend, dy, y, scale):
    if backend == "triton":
        from minigpt.kernels import softmax as k

        return k.softmax_bwd(dy, y, scale)
    return _backend.extension().softmax_bwd(dy, y, scale)


def _fwd_impl(x: Tensor, scale: float, causal: bool, T: int, backend: str) -> Tensor:
    """x (M, N) contiguous -> y (M, N) in x's dtype. ``T`` is the query length for causal."""
    return _kernel_fwd(backend, x, scale, causal, T)


_fwd = torch.library.custom_op("minigpt::softmax_fwd", mutates_args=())(_fwd_impl)


@_fwd.register_fake
def _(x, scale, causal, T, backend):
    return torch.empty_like(x)


def _bwd_impl(dy: Tensor, y: Tensor, scale: float, backend: str) -> Tensor:
    """dy, y (M, N) contiguous -> dx (M, N) in y's dtype."""
    return _kernel_bwd(backend, dy, y, scale)


_bwd = torch.library.custom_op("minigpt::softmax_bwd", mutates_args=())(_bwd_impl)


@_bwd.register_fake
def _(dy, y, scale, backend):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    _x, scale, _causal, _T, backend = inputs
    ctx.save_for_backward(output)
    ctx.scale = scale
    ctx.backend = backend


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    bwd = bwd_op(ctx, _bwd, _bwd_impl)
    dx = bwd(dy.contiguous().to(y.dtype), y, ctx.scale, ctx.backend)
    return dx, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)
# Eager mode skips the custom op's costly autograd wrapper (see _eager.py).
_EagerSoftmax = eager_function("_EagerSoftmax", _fwd_impl, _setup_context, _backward)


def softmax(x: Tensor, scale: float = 1.0, causal: bool = False,
            backend: Optional[str] = None) -> Tensor:
    """softmax(scale * x) over the last dimension, computed in float32 (float64 for float64).

    ``causal=True`` treats the last two dims as (T, S) and masks element (i, j) where
    j > i + S - T (keys aligned to the end, as with a KV cache); a row with every element
    masked (T > S) is all zeros. ``backend``: "triton", "cuda", "cpu", "torch" or None
    (best for the device, or ``$MINIGPT_BACKEND``).
    """
    _checks.tensor(OP, "x", x)
    _checks.nonempty_last_dim(OP, "x", x)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{OP}: scale must be a real number (not a tensor), got "
                        f"{type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{OP}: scale must be finite, got {scale!r}")
    _checks.scale_range(OP, scale, x.dtype)
    if not isinstance(causal, bool):
        raise TypeError(f"{OP}: causal must be True or False, got {causal!r}")
    if causal and x.dim() < 2:
        raise ValueError(f"{OP}: causal=True needs x of shape (..., T, S), got a "
                         f"{x.dim()}-D tensor of shape {tuple(x.shape)}")

    be = _backend.resolve(OP, backend, x.device, x.dtype)
    if be == "torch" or x.numel() == 0:  # no rows: nothing to launch
        return reference.softmax(x, scale, causal)

    shape = x.shape
    N = shape[-1]
    T = shape[-2] if causal else 1
    x2 = rows(x, N)
    y = pick(_fwd, _EagerSoftmax, _fwd_impl, x2)(x2, float(scale), causal, int(T), be)
    return shaped(y, shape)
