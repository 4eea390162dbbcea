"""swiglu: the one dispatch point for SwiGLU's activation, ``silu(gate) * up``.

Backends: kernels/swiglu.py (triton), csrc/swiglu_cuda.cu (cuda), csrc/swiglu.cpp (cpu),
minigpt/reference/swiglu.py (torch). The kernel backends go through the custom ops
``minigpt::swiglu_fwd`` / ``minigpt::swiglu_bwd``. Only gate and up are saved for backward
(silu(gate) is recomputed there), so the fused op keeps no fp32 temporaries alive.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from minigpt import _backend, reference
from minigpt.ops import _checks
from minigpt.ops._eager import bwd_op, eager_function, pick

OP = "swiglu"


def _fwd_impl(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    """gate, up: 1-D contiguous, same dtype -> silu(gate) * up in that dtype."""
    if backend == "triton":
        from minigpt.kernels import swiglu as k

        return k.swiglu_fwd(gate, up)
    return _backend.extension().swiglu_fwd(gate, up)


_fwd = torch.library.custom_op("minigpt::swiglu_fwd", mutates_args=())(_fwd_impl)


@_fwd.register_fake
def _(gate, up, backend):
    return torch.empty_like(gate)


def _bwd_impl(dy: Tensor, gate: Tensor, up: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """-> d gate, d up."""
    if backend == "triton":
        from minigpt.kernels import swiglu as k

        return tuple(k.swiglu_bwd(dy, gate, up))
    return tuple(_backend.extension().swiglu_bwd(dy, gate, up))


_bwd = torch.library.custom_op("minigpt::swiglu_bwd", mutates_args=())(_bwd_impl)


@_bwd.register_fake
def _(dy, gate, up, backend):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    bwd = bwd_op(ctx, _bwd, _bwd_impl)
    dg, du = bwd(dy.contiguous(), gate, up, ctx.backend)
    return dg, du, None


_fwd.register_autograd(_backward, setup_context=_setup_context)
# Eager mode skips the custom op's costly autograd wrapper (see _eager.py).
_EagerSwiGLU = eager_function("_EagerSwiGLU", _fwd_impl, _setup_context, _backward)


def swiglu(gate: Tensor, up: Tensor, backend: Optional[str] = None) -> Tensor:
    """``silu(gate) * up`` elementwise, computed in float32 and returned in gate's dtype.

    gate and up: the same shape (any), dtype and device. ``backend``: "triton", "cuda", "cpu",
    "torch" or None (best for the device, or ``$MINIGPT_BACKEND``).
    """
    _checks.tensor(OP, "gate", gate)
    _checks.tensor(OP, "up", up)
    if gate.shape != up.shape:
        raise ValueError(f"{OP}: gate and up must have the same shape, got {tuple(gate.shape)} "
                         f"and {tuple(up.shape)}")
    _checks.same_device(OP, gate=gate, up=up)
    _checks.same_dtype(OP, gate=gate, up=up)

    be = _backend.resolve(OP, backend, gate.device, gate.dtype)
    if be == "torch" or gate.numel() == 0:  # nothing to launch for an empty tensor
        return reference.swiglu(gate, up)
    g, u = gate.reshape(-1).contiguous(), up.reshape(-1).contiguous()
    y = pick(_fwd, _EagerSwiGLU, _fwd_impl, g, u)(g, u, be)
    return y.reshape(gate.shape)
