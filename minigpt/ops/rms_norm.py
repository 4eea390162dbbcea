"""rms_norm: the one dispatch point for RMSNorm (optionally fused with a residual add).

Backends: kernels/rms_norm.py (triton), csrc/rms_norm_cuda.cu (cuda), csrc/rms_norm.cpp (cpu),
minigpt/reference/rms_norm.py (torch). The kernel backends go through the custom ops
``minigpt::rms_norm_fwd`` / ``minigpt::rms_norm_bwd`` so torch.compile sees one opaque node
with a known output shape instead of tracing into Triton or C++.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from minigpt import _backend, reference
from minigpt.ops import _checks
from minigpt.ops._eager import (bwd_op, cast_output, eager_function, h_dtype, kernel_inputs,
                                leaf_backed, native_norm_params, norm_dtypes, norm_param, pick,
                                rows, shaped, split_now, x_grad, x_grad_fake)

OP = "rms_norm"


def _kernel_fwd(backend, x, weight, residual, eps, out_dtype):
    if backend == "triton":
        from minigpt.kernels import rms_norm as k

        return k.rms_norm_fwd(x, weight, residual, eps, out_dtype)
    y, h, rstd = _backend.extension().rms_norm_fwd(x, weight, residual, eps)
    return (y if out_dtype is None else y.to(out_dtype)), h, rstd


def _kernel_bwd(backend, dy, dh, h, weight, rstd, x_dtype, split):
    """-> dx (h's dtype), x's gradient as a tensor of its own where x_dtype differs or
    ``split`` (else empty), dweight."""
    if backend == "triton":
        from minigpt.kernels import rms_norm as k

        return k.rms_norm_bwd(dy, dh, h, weight, rstd, x_dtype, split=split)
    # The C++/CUDA kernels take dy in h's dtype (an out_dtype output's gradient is not).
    narrow = x_dtype != h.dtype  # the cast below is x's own tensor already
    dx, dw, dx2 = _backend.extension().rms_norm_bwd(dy.to(h.dtype), dh, h, weight, rstd,
                                                    split and not narrow)
    return dx, (dx.to(x_dtype) if narrow else dx2), dw


def _fwd_impl(x: Tensor, weight: Tensor, residual: Optional[Tensor], eps: float,
              backend: str, out_dtype: Optional[torch.dtype] = None,
              split_grads: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual (M, N) contiguous -> y (in out_dtype, or h's), h (empty without residual),
    rstd (M,) in the accumulation dtype (fp32; fp64 for fp64 x). ``split_grads``: see
    _eager.split_now."""
    return tuple(_kernel_fwd(backend, x, weight, residual, eps, out_dtype))


_fwd = torch.library.custom_op("minigpt::rms_norm_fwd", mutates_args=())(_fwd_impl)


@_fwd.register_fake
def _(x, weight, residual, eps, backend, out_dtype=None, split_grads=False):
    hd = h_dtype(x, residual)
    h = x.new_empty(x.shape, dtype=hd) if residual is not None else x.new_empty(0)
    rstd = x.new_empty(x.shape[0], dtype=torch.float64 if hd == torch.float64 else torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype or hd), h, rstd


def _bwd_impl(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, rstd: Tensor,
              backend: str, x_dtype: torch.dtype,
              split: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx (M, N) in h's dtype (it is also d residual), x's own gradient where it needs one
    (in x's dtype when x is narrower than h, or a second copy with ``split``; else empty),
    dweight in weight's (accumulation) dtype."""
    return tuple(_kernel_bwd(backend, dy, dh, h, weight, rstd, x_dtype, split))


_bwd = torch.library.custom_op("minigpt::rms_norm_bwd", mutates_args=())(_bwd_impl)


@_bwd.register_fake
def _(dy, dh, h, weight, rstd, backend, x_dtype, split=False):
    return torch.empty_like(h), x_grad_fake(h, x_dtype, split), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, backend, _, split_grads = inputs
    y, h, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)
    ctx.set_materialize_grads(False)  # no zero gradient made for rstd (see layer_norm)
    ctx.y_dtype = y.dtype
    ctx.has_residual = residual is not None
    ctx.x_dtype = x.dtype
    ctx.backend = backend
    ctx.split_grads = split_grads


def _backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    if dy is None and dh is None:
        return None, None, None, None, None, None, None
    if dy is None:  # only h was used: its gradient still passes through the add
        dy = torch.zeros(h.shape, dtype=ctx.y_dtype, device=h.device)
    dh = dh.contiguous() if (ctx.has_residual and dh is not None) else None
    bwd = bwd_op(ctx, _bwd, _bwd_impl)
    split = split_now(ctx, 0, 2)  # inputs 0 and 2: x and residual
    dx, dx_x, dw = bwd(dy.contiguous(), dh, h, weight, rstd, ctx.backend, ctx.x_dtype, split)
    # dx is in h's dtype, the residual's gradient as is; x's comes from the same kernel as a
    # tensor of its own where it needs one (a narrower branch, or both stored as .grad).
    return (x_grad(ctx, dx, dx_x, split), dw, (dx if ctx.has_residual else None),
            None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)
# Eager mode skips the custom op's costly autograd wrapper (see _eager.py).
_EagerRMSNorm = eager_function("_EagerRMSNorm", _fwd_impl, _setup_context, _backward,
                               nondiff_outputs=(2,), nondiff_unless={1: (0, 2)})


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Optional[Tensor] = None,
             backend: Optional[str] = None, out_dtype: Optional[torch.dtype] = None):
    """RMSNorm over the last dimension of ``x``: ``x / sqrt(mean(x^2) + eps) * weight``,
    computed in float32 and returned in x's dtype.

    With ``residual`` it first forms ``h = x + residual`` (rounded to the promoted dtype of the
    two, as the unfused add would be) and returns ``(rms_norm(h), h)`` from one pass over memory
    (the pre-norm transformer's "add & norm"); ``residual`` may be wider than ``x`` (a bf16
    branch added to an fp32 residual stream under autocast), and the output then takes h's
    dtype. ``out_dtype``: the normalized output's dtype instead (see ``layer_norm``, also for
    second derivatives and hooks on ``h``).
    ``backend``: "triton", "cuda", "cpu", "torch" or None (best for the device, or
    ``$MINIGPT_BACKEND``).
    """
    _checks.tensor(OP, "x", x)
    _checks.tensor(OP, "weight", weight)
    _checks.nonempty_last_dim(OP, "x", x)
    N = x.shape[-1]
    _checks.shape(OP, "weight", weight, (N,))
    if residual is not None:
        _checks.tensor(OP, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{OP}: residual must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
    _checks.same_device(OP, x=x, weight=weight, residual=residual)
    eps = _checks.eps(OP, eps)
    _checks.out_dtype(OP, out_dtype)

    hd, out_dtype = norm_dtypes(x, residual, out_dtype)
    be = _backend.resolve(OP, backend, x.device, hd)
    if be == "torch" or x.numel() == 0:  # the reference; or no rows: nothing to launch
        return cast_output(reference.rms_norm(x, weight, eps, residual), out_dtype)

    x, residual = kernel_inputs(x, residual, be)
    shape = x.shape
    x2 = rows(x, N)
    r2 = rows(residual, N) if residual is not None else None
    # The weight in fp32 math (fp64 for fp64 x): bf16 activations with fp32 master weights
    # lose nothing (norm_param: which backend casts it).
    acc = torch.float64 if hd == torch.float64 else torch.float32
    w = norm_param(weight, acc, be, native_norm_params(be, hd, weight))
    fwd = pick(_fwd, _EagerRMSNorm, _fwd_impl, x2, w, r2)
    split = residual is not None and leaf_backed(x) and leaf_backed(residual)
    y, h, _ = fwd(x2, w, r2, float(eps), be, out_dtype, split)
    if residual is None:
        return shaped(y, shape)
    return shaped(y, shape), shaped(h, shape)
