"""attention / decode_attention: the one dispatch point for scaled dot-product attention.

Backends: kernels/attention.py (triton), csrc/attention_cuda.cu (cuda), csrc/attention.cpp (cpu),
minigpt/reference/attention.py (torch). The kernel backends go through the custom ops
``minigpt::attention_fwd`` / ``minigpt::attention_bwd`` / ``minigpt::decode_attention_fwd`` so
torch.compile sees one opaque node with known output shapes instead of tracing into a kernel.

Every kernel is flash-style: tiles of queries against tiles of keys with an online softmax,
never the T x S score matrix. The forward saves the per-row logsumexp (natural log, fp32; fp64
for fp64 inputs) and the backward recomputes the probabilities from it. A query that sees no
key (only when causal and T > S) gets a zero output and lse = +inf, so the backward's
exp(s - lse) is exactly 0 on that row instead of exp(-inf + inf) = nan.

Dropout on the probabilities (``dropout_p`` > 0) has its own custom ops,
``minigpt::attention_dropout_fwd`` / ``_bwd`` (triton and cpu; the torch backend is the
reference with the same mask; the cuda kernels have none), so ``dropout_p=0`` runs exactly the
code it ran before dropout existed. The mask is never stored: the kernels draw it from a seed
with Triton's counter-based Philox (the C++ kernel with the same function, csrc/philox.h), the
forward and backward alike. The seed is drawn per call from torch's default CPU generator
(``torch.manual_seed`` makes a run reproducible) and travels as a CPU int64 tensor, which
torch.compile passes through without a graph break.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from minigpt import _backend, reference
from minigpt.ops import _checks
from minigpt.ops._eager import bwd_op, eager_function, pick, transformed

OP = "attention"
DECODE_OP = "decode_attention"
# Backends with dropout on the probabilities: the Triton and C++ kernels and the reference,
# which all draw the same mask from a seed (minigpt/reference/philox.py).
DROPOUT_BACKENDS = ("triton", "cpu", "torch")
# Widest head the Triton and CUDA kernels take (their tiles keep a query row in registers or
# shared memory); the C++ kernel takes any width.
MAX_GPU_HEAD_DIM = 256


def _ext():
    return _backend.extension()


def _kernel_fwd(backend, q, k, v, causal, scale):
    if backend == "triton":
        from minigpt.kernels import attention as kern

        return kern.attention_fwd(q, k, v, causal, scale)
    return _ext().attention_fwd(q, k, v, causal, scale)


def _kernel_bwd(backend, do, q, k, v, out, lse, causal, scale):
    if backend == "triton":
        from minigpt.kernels import attention as kern

        return kern.attention_bwd(do, q, k, v, out, lse, causal, scale)
    return _ext().attention_bwd(do, q, k, v, out, lse, causal, scale)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _out_like(t, backend):
    """An empty tensor of t's shape and dtype in the layout ``backend``'s kernels write their
    outputs and gradients in: (B, H, T, D) stored as (B, T, H, D) for Triton
    (kernels/attention.py heads_inner: a model's transpose back to (B, T, H * D) is then a
    view), contiguous for the C++ and CUDA kernels. The fake implementations must give the
    real layout: torch.compile plans the views and copies after the op by it."""
    if backend == "triton":
        from minigpt.kernels import attention as kern

        return kern.heads_inner(*t.shape, t.dtype, t.device)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
              backend: str) -> tuple[Tensor, Tensor]:
    """q (B, Hq, T, D), k, v (B, Hkv, S, D), any strides with a unit last stride ->
    out (B, Hq, T, D) in q's dtype and the backend's layout (_out_like), lse (B, Hq, T)
    contiguous in the accumulation dtype."""
    out, lse = _kernel_fwd(backend, q, k, v, causal, scale)
    return out, lse


_fwd = torch.library.custom_op("minigpt::attention_fwd", mutates_args=())(_fwd_impl)


@_fwd.register_fake
def _(q, k, v, causal, scale, backend):
    B, H, T, _ = q.shape
    return _out_like(q, backend), q.new_empty((B, H, T), dtype=_lse_dtype(q.dtype))


def _bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
              scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv in the shapes and dtype of q, k, v and the backend's layout (_out_like)."""
    dq, dk, dv = _kernel_bwd(backend, do, q, k, v, out, lse, causal, scale)
    return dq, dk, dv


_bwd = torch.library.custom_op("minigpt::attention_bwd", mutates_args=())(_bwd_impl)


@_bwd.register_fake
def _(do, q, k, v, out, lse, causal, scale, backend):
    return _out_like(q, backend), _out_like(k, backend), _out_like(v, backend)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.set_materialize_grads(False)  # no zero gradient made for lse, a statistic
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None
    dout = _unit_last(dout)
    bwd = bwd_op(ctx, _bwd, _bwd_impl)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)
# Eager mode skips the custom op's costly autograd wrapper (see _eager.py); lse is a saved
# statistic, not a differentiable output.
_EagerAttention = eager_function("_EagerAttention", _fwd_impl, _setup_context, _backward,
                                 nondiff_outputs=(1,))


def _drop_fwd_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                   dropout_p: float, seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """_fwd_impl with dropout on the probabilities (triton or cpu); ``seed`` a CPU int64
    tensor. lse is the undropped softmax's."""
    if backend == "triton":
        from minigpt.kernels import attention as kern

        return kern.attention_fwd(q, k, v, causal, scale, dropout_p=dropout_p, seed=int(seed))
    out, lse = _ext().attention_fwd(q, k, v, causal, scale, dropout_p, int(seed))
    return out, lse


_drop_fwd = torch.library.custom_op("minigpt::attention_dropout_fwd",
                                    mutates_args=())(_drop_fwd_impl)


@_drop_fwd.register_fake
def _(q, k, v, causal, scale, dropout_p, seed, backend):
    B, H, T, _ = q.shape
    return _out_like(q, backend), q.new_empty((B, H, T), dtype=_lse_dtype(q.dtype))


def _drop_bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   causal: bool, scale: float, dropout_p: float, seed: Tensor,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """_bwd with the forward's dropout mask, regenerated from its seed."""
    if backend == "triton":
        from minigpt.kernels import attention as kern

        return kern.attention_bwd(do, q, k, v, out, lse, causal, scale, dropout_p=dropout_p,
                                  seed=int(seed))
    dq, dk, dv = _ext().attention_bwd(do, q, k, v, out, lse, causal, scale, dropout_p,
                                      int(seed))
    return dq, dk, dv


_drop_bwd = torch.library.custom_op("minigpt::attention_dropout_bwd",
                                    mutates_args=())(_drop_bwd_impl)


@_drop_bwd.register_fake
def _(do, q, k, v, out, lse, causal, scale, dropout_p, seed, backend):
    return _out_like(q, backend), _out_like(k, backend), _out_like(v, backend)


def _drop_setup_context(ctx, inputs, output):
    q, k, v, causal, scale, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.set_materialize_grads(False)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.backend = causal, scale, dropout_p, backend


def _drop_backward(ctx, dout, _dlse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None, None, None
    dout = _unit_last(dout)
    bwd = bwd_op(ctx, _drop_bwd, _drop_bwd_impl)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.dropout_p, seed,
                           ctx.backend)
    return dq, dk, dv, None, None, None, None, None


_drop_fwd.register_autograd(_drop_backward, setup_context=_drop_setup_context)
_EagerDropoutAttention = eager_function("_EagerDropoutAttention", _drop_fwd_impl,
                                        _drop_setup_context, _drop_backward,
                                        nondiff_outputs=(1,))


# attention_qkv: the same kernels on the q | k | v projection of a fused qkv linear, taken whole.
# With q, k and v split off by the model, autograd's split backward concatenates their three
# gradients into one (B, T, 3C) tensor for the linear's backward: a copy of it a layer (GPT-2
# small: 75 MB, ~45 us on an H100, 12 a step). Here the backward writes the three gradients
# straight into the q | k | v slices of one tensor (Triton; the other backends concatenate).


def _qkv_split(qkv: Tensor, H: int, Hkv: int):
    """q (B, H, T, D), k, v (B, Hkv, T, D): views of qkv (B, T, (H + 2 Hkv) D), contiguous."""
    B, T, W = qkv.shape
    D = W // (H + 2 * Hkv)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=2)
    return (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2),
            v.view(B, T, Hkv, D).transpose(1, 2))


def _qkv_fwd_impl(qkv: Tensor, n_head: int, n_kv_head: int, causal: bool, scale: float,
                  dropout_p: float, seed: Optional[Tensor],
                  backend: str) -> tuple[Tensor, Tensor]:
    """qkv (B, T, (H + 2 Hkv) D) contiguous -> out (B, H, T, D) (the backend's layout), lse."""
    q, k, v = _qkv_split(qkv, n_head, n_kv_head)
    if dropout_p > 0.0:
        return _drop_fwd_impl(q, k, v, causal, scale, dropout_p, seed, backend)
    return _fwd_impl(q, k, v, causal, scale, backend)


_qkv_fwd = torch.library.custom_op("minigpt::attention_qkv_fwd", mutates_args=())(_qkv_fwd_impl)


@_qkv_fwd.register_fake
def _(qkv, n_head, n_kv_head, causal, scale, dropout_p, seed, backend):
    q = _qkv_split(qkv, n_head, n_kv_head)[0]
    B, H, T, _ = q.shape
    return _out_like(q, backend), q.new_empty((B, H, T), dtype=_lse_dtype(q.dtype))


def _qkv_bwd_impl(do: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, n_head: int,
                  n_kv_head: int, causal: bool, scale: float, dropout_p: float,
                  seed: Optional[Tensor], backend: str) -> Tensor:
    """-> dqkv, qkv's shape, contiguous."""
    q, k, v = _qkv_split(qkv, n_head, n_kv_head)
    if backend == "triton":
        from minigpt.kernels import attention as kern

        dqkv = torch.empty_like(qkv)
        kern.attention_bwd(do, q, k, v, out, lse, causal, scale, dropout_p=dropout_p,
                           seed=int(seed) if seed is not None else 0,
                           grads=_qkv_split(dqkv, n_head, n_kv_head))
        return dqkv
    if dropout_p > 0.0:
        grads = _drop_bwd_impl(do, q, k, v, out, lse, causal, scale, dropout_p, seed, backend)
    else:
        grads = _bwd_impl(do, q, k, v, out, lse, causal, scale, backend)
    B, T, _ = qkv.shape
    return torch.cat([g.transpose(1, 2).reshape(B, T, -1) for g in grads], dim=2)


_qkv_bwd = torch.library.custom_op("minigpt::attention_qkv_bwd", mutates_args=())(_qkv_bwd_impl)


@_qkv_bwd.register_fake
def _(do, qkv, out, lse, n_head, n_kv_head, causal, scale, dropout_p, seed, backend):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _qkv_setup_context(ctx, inputs, output):
    qkv, n_head, n_kv_head, causal, scale, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, seed)
    ctx.set_materialize_grads(False)
    ctx.args = (n_head, n_kv_head, causal, scale, dropout_p)
    ctx.backend = backend


def _qkv_backward(ctx, dout, _dlse):
    qkv, out, lse, seed = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None, None, None
    dout = _unit_last(dout)
    bwd = bwd_op(ctx, _qkv_bwd, _qkv_bwd_impl)
    dqkv = bwd(dout, qkv, out, lse, *ctx.args, seed, ctx.backend)
    return dqkv, None, None, None, None, None, None, None


_qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)
_EagerQKVAttention = eager_function("_EagerQKVAttention", _qkv_fwd_impl, _qkv_setup_context,
                                    _qkv_backward, nondiff_outputs=(1,))


def _decode_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float,
                 backend: str) -> Tensor:
    """q (B, Hq, 1, D), caches (B, Hkv, S_max, D) with unit last strides, cache_seqlens (B,)
    int32 -> out (B, Hq, 1, D) contiguous."""
    if backend == "triton":
        from minigpt.kernels import attention as kern

        return kern.decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale)
    return _ext().decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale)


_decode = torch.library.custom_op("minigpt::decode_attention_fwd", mutates_args=())(_decode_impl)


@_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _check_qkv(op, q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(op, name, t)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (batch, heads, seq, head_dim), got shape "
                             f"{tuple(t.shape)}")
    _checks.same_device(op, q=q, k=k, v=v)
    _checks.same_dtype(op, q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    B, Hq, _, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"{op}: batch mismatch: q has {B} sequences, k and v have {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"{op}: head dim mismatch: q has head_dim {D}, k and v have "
                         f"{k.shape[3]}")
    if D == 0:
        raise ValueError(f"{op}: head_dim must be positive, got shape {tuple(q.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{op}: the number of query heads ({Hq}) must be a multiple of the "
                         f"number of key/value heads ({Hkv})")


def _check_scale(op, scale, D, dtype):
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"{op}: scale must be a finite number or None, got {scale!r}")
    _checks.scale_range(op, scale, dtype)
    return float(scale)


def _check_head_dim(op, be, D):
    if be in ("triton", "cuda") and D > MAX_GPU_HEAD_DIM:
        raise ValueError(f"{op}: the {be} backend takes head_dim up to {MAX_GPU_HEAD_DIM}, got "
                         f"{D}; use backend='torch'")


def _check_dropout(op, p):
    if (isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p)
            or not 0.0 <= p < 1.0):
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1), got {p!r}")
    return float(p)


def _unit_last(t):
    # Kernels take any batch/head/sequence strides (a transpose of (B, T, H, D) is free) but
    # need each head vector contiguous. A head dim of 1 counts as contiguous to torch at any
    # stride (contiguous() is a no-op there): its one element is reached at offset 0, so the
    # stride is restated as 1 in a view.
    if t.stride(-1) == 1:
        return t
    if t.shape[-1] == 1:
        return t.as_strided(t.shape, t.stride()[:-1] + (1,))
    return t.contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None,
              backend: Optional[str] = None, dropout_p: float = 0.0) -> Tensor:
    """softmax(q kᵀ · scale) v, fused (flash attention), forward and backward.

    q ``(B, Hq, T, D)``; k, v ``(B, Hkv, S, D)`` with Hq a multiple of Hkv (MHA, GQA, MQA:
    query head h reads key/value head ``h // (Hq // Hkv)``). ``causal`` is aligned to the end:
    query i sees keys ``j <= i + S - T`` (prefill after a cache works); a query that sees no
    key gets zeros. ``scale`` defaults to ``1/sqrt(D)``. ``backend``: "triton", "cuda", "cpu",
    "torch" or None (best for the device, or ``$MINIGPT_BACKEND``). The output is (B, Hq, T, D)
    but not always contiguous: Triton's is stored as (B, T, Hq, D), as SDPA-flash's, so
    ``out.transpose(1, 2).reshape(B, T, Hq * D)`` is a view.

    ``dropout_p`` in [0, 1): dropout on the attention probabilities, as SDPA's (each zeroed
    with probability p, the kept ones scaled by 1/(1-p)); pass 0 outside training. Its mask
    comes from a seed drawn from torch's default CPU generator, so ``torch.manual_seed``
    controls it. The triton, cpu and torch backends have it (the same mask for the same seed),
    the cuda backend not; ``backend=None`` picks triton for CUDA tensors and cpu (the C++
    kernel, else torch) on CPU.
    """
    _check_qkv(OP, q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"{OP}: causal must be a bool, got {causal!r}")
    D = q.shape[-1]
    scale = _check_scale(OP, scale, D, q.dtype)
    if dropout_p.__class__ is not float or dropout_p != 0.0:  # the default skips the checks
        dropout_p = _check_dropout(OP, dropout_p)
        if dropout_p > 0.0:
            return _attention_dropout(q, k, v, causal, scale, dropout_p, backend)
    be, _ = _pick_backend(OP, backend, q.device, q.dtype, D, 0.0)
    if be == "torch" or q.numel() == 0 or k.numel() == 0:
        # Nothing to launch for empty inputs; the reference gives the right (zero) answer.
        return reference.attention(q, k, v, causal, scale)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out, _ = pick(_fwd, _EagerAttention, _fwd_impl, q, k, v)(q, k, v, causal, scale, be)
    return out


def _pick_backend(op, backend, device, dtype, D, dropout_p):
    """(backend, seed) for an attention call: the requested or default backend (with dropout,
    one of DROPOUT_BACKENDS), the reference for a default GPU backend past its widest head,
    and with dropout a seed drawn from torch's default generator (None without)."""
    seed = None
    if dropout_p > 0.0:
        if backend == "cuda":
            raise ValueError(f"{op}: the {backend} backend has no dropout (dropout_p="
                             f"{dropout_p}); use one of {DROPOUT_BACKENDS} or backend=None")
        be = _backend.resolve(f"{op} with dropout_p > 0", backend, device, dtype,
                              supported=DROPOUT_BACKENDS)
    else:
        be = _backend.resolve(op, backend, device, dtype)
    if backend is None and be in ("triton", "cuda") and D > MAX_GPU_HEAD_DIM:
        be = "torch"
    _check_head_dim(op, be, D)
    if dropout_p > 0.0:
        # A non-negative int64: the kernels' tl.rand and reference/philox.py take any such seed.
        seed = torch.randint(2**63 - 1, (), dtype=torch.int64)
    return be, seed


def _attention_dropout(q, k, v, causal, scale, dropout_p, backend):
    be, seed = _pick_backend(OP, backend, q.device, q.dtype, q.shape[-1], dropout_p)
    if be == "torch" or q.numel() == 0 or k.numel() == 0:
        return reference.attention(q, k, v, causal, scale, dropout_p, seed)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out, _ = pick(_drop_fwd, _EagerDropoutAttention, _drop_fwd_impl, q, k, v)(
        q, k, v, causal, scale, dropout_p, seed, be)
    return out


def attention_qkv(qkv: Tensor, n_head: int, n_kv_head: Optional[int] = None,
                  causal: bool = True, scale: Optional[float] = None,
                  backend: Optional[str] = None, dropout_p: float = 0.0) -> Tensor:
    """``attention`` on the output of a fused q | k | v projection: ``qkv`` ``(B, T, (Hq + 2 Hkv)
    D)`` holds each token's Hq query heads, then its Hkv key heads, then its Hkv value heads
    (``n_kv_head`` defaults to ``n_head``); returns ``(B, T, Hq D)``, the heads side by side, as
    the output projection takes them. Same math, arguments and backends as ``attention`` (self-
    attention: S = T). Its backward hands back one ``(B, T, (Hq + 2 Hkv) D)`` gradient, which the
    Triton backward writes in place of the three a split would concatenate.
    """
    op = "attention_qkv"
    _checks.tensor(op, "qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"{op}: qkv must be 3-D (batch, seq, (n_head + 2 n_kv_head) * "
                         f"head_dim), got shape {tuple(qkv.shape)}")
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    for name, n in (("n_head", n_head), ("n_kv_head", n_kv_head)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {n!r}")
    n_head, n_kv_head = int(n_head), int(n_kv_head)
    if n_head % n_kv_head:
        raise ValueError(f"{op}: the number of query heads ({n_head}) must be a multiple of the "
                         f"number of key/value heads ({n_kv_head})")
    B, T, W = qkv.shape
    heads = n_head + 2 * n_kv_head
    if W == 0 or W % heads:
        raise ValueError(f"{op}: qkv's last dimension ({W}) must be (n_head + 2 n_kv_head) = "
                         f"{heads} heads of a positive head_dim")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {causal!r}")
    D = W // heads
    scale = _check_scale(op, scale, D, qkv.dtype)
    if dropout_p.__class__ is not float or dropout_p != 0.0:
        dropout_p = _check_dropout(op, dropout_p)
    be, seed = _pick_backend(op, backend, qkv.device, qkv.dtype, D, dropout_p)
    if be == "torch" or qkv.numel() == 0:
        q, k, v = _qkv_split(qkv, n_head, n_kv_head)
        out = reference.attention(q, k, v, causal, scale, dropout_p, seed)
    else:
        qkv = qkv.contiguous()
        fwd = pick(_qkv_fwd, _EagerQKVAttention, _qkv_fwd_impl, qkv)
        out, _ = fwd(qkv, n_head, n_kv_head, causal, scale, dropout_p, seed, be)
    return out.transpose(1, 2).reshape(B, T, n_head * D)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     scale: Optional[float] = None, backend: Optional[str] = None,
                     check_lengths: bool = True) -> Tensor:
    """One new query per sequence against its KV cache (flash-decoding on GPU: the keys are
    split across programs and the partial softmaxes combined).

    q ``(B, Hq, 1, D)``; caches ``(B, Hkv, S_max, D)``; ``cache_seqlens`` an integer tensor
    ``(B,)``: sequence b attends to its first ``cache_seqlens[b]`` keys (1..S_max; the new
    token's key and value already written). Forward only: with autograd recording, under
    forward-mode AD (a dual input) or a torch.func transform it runs the (differentiable)
    reference instead. ``check_lengths=False`` skips the range check of
    ``cache_seqlens``, which on a GPU costs a host sync per call: for callers that keep the
    lengths themselves (``KVCache``); the kernels clamp them to the cache either way.
    """
    op = DECODE_OP
    _check_qkv(op, q, k_cache, v_cache)
    B, _, Tq, D = q.shape
    if Tq != 1:
        raise ValueError(f"{op}: q must hold one query per sequence, shape (B, Hq, 1, D), got "
                         f"{tuple(q.shape)}")
    S_max = k_cache.shape[2]
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"{op}: cache_seqlens must be a torch.Tensor, got "
                        f"{type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    _checks.shape(op, "cache_seqlens", cache_seqlens, (B,))
    _checks.same_device(op, q=q, cache_seqlens=cache_seqlens)
    if check_lengths and B and _checks.host_checks(cache_seqlens):
        # One host sync (skipped while a CUDA graph is being captured, where it is not allowed;
        # the kernels clamp the lengths to the cache there, so nothing reads out of bounds).
        if cache_seqlens.is_cpu:
            lens = cache_seqlens.tolist()
            lo, hi = min(lens), max(lens)
        else:
            lo, hi = torch.stack(torch.aminmax(cache_seqlens)).tolist()
        if S_max == 0:
            raise ValueError(f"{op}: the cache has no positions (k_cache's S_max is 0)")
        if lo < 1 or hi > S_max:
            raise ValueError(f"{op}: cache_seqlens must lie in [1, {S_max}] (the cache length), "
                             f"got values in [{lo}, {hi}]")
    scale = _check_scale(op, scale, D, q.dtype)
    be = _backend.resolve(op, backend, q.device, q.dtype)
    if backend is None and be in ("triton", "cuda") and D > MAX_GPU_HEAD_DIM:
        be = "torch"
    _check_head_dim(op, be, D)
    compiling = torch.compiler.is_compiling()
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k_cache, v_cache))
    # The kernels are forward only: any derivative (autograd; forward-mode AD, whose tangent
    # the kernel dropped without a word; torch.func's grad, vmap, jvp, which reached the
    # kernel with wrapper tensors it cannot read) is the reference's, as documented.
    if (be == "torch" or needs_grad or q.numel() == 0
            or (not compiling and transformed(q, k_cache, v_cache))):
        return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)
    # Forward only and no autograd recording here, so outside torch.compile the kernel is
    # called directly.
    decode = _decode if compiling else _decode_impl
    if cache_seqlens.dtype == torch.int64:
        # Clamped before the narrowing, which would wrap 2**32 + 2 to 2: the kernels clamp
        # lengths to the cache, and unchecked ones (check_lengths=False, no_host_sync) must
        # mean what the reference makes of them.
        cache_seqlens = cache_seqlens.clamp(0, S_max)
    return decode(_unit_last(q), _unit_last(k_cache), _unit_last(v_cache),
                  cache_seqlens.to(torch.int32).contiguous(), scale, be)
