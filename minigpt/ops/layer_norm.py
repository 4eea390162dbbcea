"""layer_norm: the one dispatch point for LayerNorm (optionally fused with a residual add).

Backends: kernels/layer_norm.py (triton), csrc/layer_norm_cuda.cu (cuda), csrc/layer_norm.cpp
(cpu), minigpt/reference/layer_norm.py (torch). The kernel backends go through the custom
ops ``minigpt::layer_norm_fwd`` / ``minigpt::layer_norm_bwd`` so torch.compile sees one opaque
node with a known output shape instead of tracing into Triton or C++.
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

OP = "layer_norm"


def _kernel_fwd(backend, x, weight, bias, residual, eps, out_dtype):
    if backend == "triton":
        from minigpt.kernels import layer_norm as k

        return k.layer_norm_fwd(x, weight, bias, residual, eps, out_dtype)
    y, h, mean, rstd = _backend.extension().layer_norm_fwd(x, weight, bias, residual, eps)
    return (y if out_dtype is None else y.to(out_dtype)), h, mean, rstd


def _kernel_bwd(backend, dy, dh, h, weight, mean, rstd, has_bias, x_dtype, split):
    """-> dx (h's dtype), x's gradient as a tensor of its own where x_dtype differs or
    ``split`` (else empty), dweight, dbias."""
    if backend == "triton":
        from minigpt.kernels import layer_norm as k

        return k.layer_norm_bwd(dy, dh, h, weight, mean, rstd, has_bias, x_dtype, split=split)
    # The C++/CUDA kernels take dy in h's dtype (an out_dtype output's gradient is not).
    narrow = x_dtype != h.dtype  # the cast below is x's own tensor already
    dx, dw, db, dx2 = _backend.extension().layer_norm_bwd(dy.to(h.dtype), dh, h, weight, mean,
                                                          rstd, has_bias, split and not narrow)
    return dx, (dx.to(x_dtype) if narrow else dx2), dw, db


def _fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
              eps: float, backend: str, out_dtype: Optional[torch.dtype] = None,
              split_grads: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual (M, N) contiguous -> y (in out_dtype, or h's), h (empty without residual),
    mean, rstd (M,) in the accumulation dtype (fp32; fp64 for fp64 x). ``split_grads``:
    x and residual are leaves: backward gives them gradients of their own where it stores both
    as .grad (_eager.split_now)."""
    return tuple(_kernel_fwd(backend, x, weight, bias, residual, eps, out_dtype))


_fwd = torch.library.custom_op("minigpt::layer_norm_fwd", mutates_args=())(_fwd_impl)


@_fwd.register_fake
def _(x, weight, bias, residual, eps, backend, out_dtype=None, split_grads=False):
    M = x.shape[0]
    hd = h_dtype(x, residual)
    h = x.new_empty(x.shape, dtype=hd) if residual is not None else x.new_empty(0)
    stats = x.new_empty(M, dtype=torch.float64 if hd == torch.float64 else torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype or hd), h, stats, torch.empty_like(stats)


def _bwd_impl(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, mean: Tensor,
              rstd: Tensor, has_bias: bool, backend: str, x_dtype: torch.dtype,
              split: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dx (M, N) in h's dtype (it is also d residual), x's own gradient where it needs one
    (else empty): in x's dtype when x is narrower than h (a bf16 branch on an fp32 residual
    stream), or a second copy with ``split`` (_eager.x_grad); dweight in weight's dtype,
    dbias (empty if no bias) in fp32 for a 16-bit weight, else in weight's dtype."""
    return tuple(_kernel_bwd(backend, dy, dh, h, weight, mean, rstd, has_bias, x_dtype, split))


_bwd = torch.library.custom_op("minigpt::layer_norm_bwd", mutates_args=())(_bwd_impl)


@_bwd.register_fake
def _(dy, dh, h, weight, mean, rstd, has_bias, backend, x_dtype, split=False):
    db_dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
    db = torch.empty_like(weight, dtype=db_dtype) if has_bias else weight.new_empty(0)
    return torch.empty_like(h), x_grad_fake(h, x_dtype, split), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, backend, _, split_grads = inputs
    y, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    # No zero gradients made for mean and rstd (statistics) or an unused output: one fill
    # kernel each, three a layer otherwise.
    ctx.set_materialize_grads(False)
    ctx.y_dtype = y.dtype
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.x_dtype = x.dtype
    ctx.backend = backend
    ctx.split_grads = split_grads


def _backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None and dh is None:
        return None, None, None, None, None, None, None, None
    if dy is None:  # only h was used: its gradient still passes through the add
        dy = torch.zeros(h.shape, dtype=ctx.y_dtype, device=h.device)
    dh = dh.contiguous() if (ctx.has_residual and dh is not None) else None
    bwd = bwd_op(ctx, _bwd, _bwd_impl)
    split = split_now(ctx, 0, 3)  # inputs 0 and 3: x and residual
    dx, dx_x, dw, db = bwd(dy.contiguous(), dh, h, weight, mean, rstd, ctx.has_bias,
                           ctx.backend, ctx.x_dtype, split)
    # dx is in h's dtype, the residual's gradient as is; x's comes from the same kernel as a
    # tensor of its own where it needs one (a narrower branch, or both stored as .grad).
    return (x_grad(ctx, dx, dx_x, split), dw,
            db if ctx.has_bias else None, dx if ctx.has_residual else None, None, None, None,
            None)



_fwd.register_autograd(_backward, setup_context=_setup_context)
# Eager mode skips the custom op's costly autograd wrapper (see _eager.py); mean and rstd are
# saved statistics, not differentiable outputs.
_EagerLayerNorm = eager_function("_EagerLayerNorm", _fwd_impl, _setup_context, _backward,
                                 nondiff_outputs=(2, 3), nondiff_unless={1: (0, 3)})


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5,
               residual: Optional[Tensor] = None, backend: Optional[str] = None,
               out_dtype: Optional[torch.dtype] = None):
    """LayerNorm over the last dimension of ``x``, computed in float32.

    With ``residual`` it first forms ``h = x + residual`` and returns ``(layer_norm(h), h)``
    from one pass over memory (the pre-norm transformer's "add & norm"). ``residual`` may have
    another float dtype than ``x`` (a bf16 branch added to an fp32 residual stream under
    autocast): ``h`` and the output then take the promoted dtype, as ``x + residual`` would.
    ``out_dtype``: the normalized output's dtype instead (``h`` keeps its own). An autocast
    model passes the autocast dtype, which its next matmul would cast the output to anyway:
    the kernel writes it rounded once, the same values, without the fp32 copy and its cast
    (and reads the gradient in that dtype too).
    ``backend``: "triton", "cuda", "cpu", "torch" or None (best for the device, or
    ``$MINIGPT_BACKEND``).

    The kernel backends compute first derivatives only (create_graph=True is refused; the
    torch backend differentiates twice), and fused, ``h`` is an output beside ``y``, not its
    input: a hook or ``retain_grad`` on ``h`` sees only the gradient reaching ``h`` itself,
    not the part through ``y``, which the backward adds internally. x's and residual's
    gradients are those of ``x + residual`` either way.
    """
    _checks.tensor(OP, "x", x)
    _checks.tensor(OP, "weight", weight)
    _checks.nonempty_last_dim(OP, "x", x)
    N = x.shape[-1]
    _checks.shape(OP, "weight", weight, (N,))
    if bias is not None:
        _checks.tensor(OP, "bias", bias)
        _checks.shape(OP, "bias", bias, (N,))
    if residual is not None:
        _checks.tensor(OP, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{OP}: residual must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
    _checks.same_device(OP, x=x, weight=weight, bias=bias, residual=residual)
    eps = _checks.eps(OP, eps)
    _checks.out_dtype(OP, out_dtype)

    hd, out_dtype = norm_dtypes(x, residual, out_dtype)
    be = _backend.resolve(OP, backend, x.device, hd)
    if be == "torch" or x.numel() == 0:  # the reference; or no rows: nothing to launch
        return cast_output(reference.layer_norm(x, weight, bias, eps, residual), out_dtype)

    x, residual = kernel_inputs(x, residual, be)
    shape = x.shape
    x2 = rows(x, N)
    r2 = rows(residual, N) if residual is not None else None
    # Parameters in fp32 math (fp64 for fp64 x): bf16 activations with fp32 master weights
    # lose nothing (norm_param: which backend casts them).
    acc = torch.float64 if hd == torch.float64 else torch.float32
    native = native_norm_params(be, hd, weight, bias)
    w = norm_param(weight, acc, be, native)
    b = norm_param(bias, acc, be, native) if bias is not None else None
    fwd = pick(_fwd, _EagerLayerNorm, _fwd_impl, x2, w, b, r2)
    split = residual is not None and leaf_backed(x) and leaf_backed(residual)
    y, h, _, _ = fwd(x2, w, b, r2, float(eps), be, out_dtype, split)
    if residual is None:
        return shaped(y, shape)
    return shaped(y, shape), shaped(h, shape)
