"""rope: the one dispatch point for rotary position embeddings (rotate-half layout, as in
Hugging Face Llama and GPT-NeoX), rotating q and k in one pass.

Backends: kernels/rope.py (triton), csrc/rope_cuda.cu (cuda), csrc/rope.cpp (cpu),
minigpt/reference/rope.py (torch). The kernel backends go through the custom op
``minigpt::rope``; its backward is the same op run as the inverse rotation (by -sin).
Gradients flow to q and k only: cos and sin are treated as constants (their gradient is
None), which is what they are in every model here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from minigpt import _backend, reference
from minigpt.ops import _checks
from minigpt.ops._eager import eager_function, is_compiling, pick

OP = "rope"


def _rope_impl(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, pos: Optional[Tensor], inverse: bool,
          backend: str) -> tuple[Tensor, Tensor]:
    """q (B, Hq, T, D), k (B, Hk, T, D) with unit last stride; cos/sin contiguous in the
    accumulation dtype, (T, D) or (B, T, D), or (L, D) tables indexed by pos ((T,) or (B, T)
    int64). -> contiguous (q_rot, k_rot); ``inverse`` rotates by -sin."""
    if backend == "triton":
        from minigpt.kernels import rope as kr

        return kr.rope(q, k, cos, sin, pos, inverse)
    return tuple(_backend.extension().rope(q, k, cos, sin, pos, inverse))


_rope = torch.library.custom_op("minigpt::rope", mutates_args=())(_rope_impl)


@_rope.register_fake
def _(q, k, cos, sin, pos, inverse, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, pos, inverse, backend = inputs
    ctx.save_for_backward(cos, sin, pos)
    ctx.inverse = inverse
    ctx.backend = backend


def _backward(ctx, dq, dk):
    cos, sin, pos = ctx.saved_tensors
    dq = dq if dq.stride(-1) == 1 else dq.contiguous()
    dk = dk if dk.stride(-1) == 1 else dk.contiguous()
    dq, dk = _rope(dq, dk, cos, sin, pos, not ctx.inverse, ctx.backend)
    return dq, dk, None, None, None, None, None


_rope.register_autograd(_backward, setup_context=_setup_context)
# Eager mode skips the custom op's costly autograd wrapper (see _eager.py).
_EagerRope = eager_function("_EagerRope", _rope_impl, _setup_context, _backward,
                            differentiable_backward=True)


def _check(q, k, cos, sin, position_ids):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _checks.tensor(OP, name, t)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{OP}: q and k must be 4-D (batch, heads, seq, head_dim), got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    B, _, T, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"{OP}: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, "
                         "seq and head_dim (heads may differ)")
    if D == 0:
        raise ValueError(f"{OP}: q has an empty last dimension (shape {tuple(q.shape)})")
    if D % 2:
        raise ValueError(f"{OP}: head_dim must be even for the rotate-half layout, got {D}")
    if position_ids is not None:
        _checks.tensor(OP, "position_ids", position_ids, float_=False)
    _checks.same_device(OP, q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    _checks.same_dtype(OP, q=q, k=k)
    if cos.shape != sin.shape:
        raise ValueError(f"{OP}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have "
                         "the same shape")
    if position_ids is None:
        ok = tuple(cos.shape) == (T, D) or (cos.dim() == 3 and tuple(cos.shape[1:]) == (T, D)
                                             and cos.shape[0] in (1, B))
        if not ok:
            raise ValueError(f"{OP}: without position_ids cos/sin must be (T, D) = {(T, D)} or "
                             f"(B, T, D) = {(B, T, D)} aligned with q, got {tuple(cos.shape)}")
        return
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or (
            position_ids.dtype == torch.bool):
        raise TypeError(f"{OP}: position_ids must be an integer tensor, got {position_ids.dtype}")
    if not (tuple(position_ids.shape) == (T,) or (position_ids.dim() == 2 and position_ids.shape[1] == T
                                                  and position_ids.shape[0] in (1, B))):
        raise ValueError(f"{OP}: position_ids must be (T,) = ({T},) or (B, T) = {(B, T)}, got "
                         f"{tuple(position_ids.shape)}")
    if cos.dim() != 2 or cos.shape[1] != D:
        raise ValueError(f"{OP}: with position_ids cos/sin must be tables (max_positions, D) "
                         f"with D = {D}, got {tuple(cos.shape)}")
    # Checking needs the values: free on CPU, a host sync on GPU (there the kernels mask an
    # out-of-range position instead of reading outside the table).
    if position_ids.device.type == "cpu" and position_ids.numel() and not is_compiling():
        lo, hi = torch.aminmax(position_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= cos.shape[0]:
            raise ValueError(f"{OP}: position_ids must lie in [0, {cos.shape[0]}) (the table "
                             f"length), got values in [{lo}, {hi}]")


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
         backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Rotate queries q (B, Hq, T, D) and keys k (B, Hk, T, D) (Hq != Hk for GQA) by rotary
    position embeddings in the rotate-half layout, in one pass; returns ``(q_rot, k_rot)``.

    cos/sin: (T, D) or (B, T, D) aligned with the queries; or, with ``position_ids`` ((T,) or
    (B, T) integers), tables (L, D) indexed by absolute position, as when decoding after a KV
    cache. Math in float32 (float64 for float64 q). q and k may be strided views (e.g. a
    transpose of (B, T, H, D)); the results are contiguous. Gradients flow to q and k only;
    cos and sin get none. ``backend``: "triton", "cuda", "cpu", "torch" or None.
    """
    _check(q, k, cos, sin, position_ids)
    be = _backend.resolve(OP, backend, q.device, q.dtype)
    if be == "torch" or q.numel() == 0 or k.numel() == 0:
        # Detached so every backend gives cos/sin the same (no) gradient. The reference indexes
        # the tables with position_ids: as int64, since a uint8 index is a boolean mask to torch
        # and int8/int16 are refused.
        pos = position_ids.long() if position_ids is not None else None
        return reference.rope(q, k, cos.detach(), sin.detach(), pos)

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c, s = cos.to(acc), sin.to(acc)
    pos = None
    if position_ids is not None:
        pos = position_ids.to(torch.int64)
        if pos.dim() == 2 and pos.shape[0] == 1:
            pos = pos[0]
        pos = pos.contiguous()
    elif c.dim() == 3 and c.shape[0] == 1:
        c, s = c[0], s[0]
    c, s = c.contiguous(), s.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    return pick(_rope, _EagerRope, _rope_impl, q, k)(q, k, c, s, pos, False, be)
