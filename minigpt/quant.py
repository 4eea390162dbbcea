"""Matmuls straight from GGUF's packed Q8_0 / Q4_1 weights, for decoding on a CPU.

A decode step multiplies a few rows by every weight of the model, so on a CPU its speed is the
speed of reading the weights. A GGUF keeps them in 4.5 (Q4_1) or 8.5 (Q8_0) bits each; the
float32 copy the model computes with is 32. ``quant_matmul`` (csrc/quant_matmul.cpp) reads the
packed bytes and dequantizes in registers with the same float32 arithmetic as
``gguf.quants.dequantize`` - the weights it multiplies by are the float32 weights exactly; only
the summation order differs from ``F.linear``.

``attach_packed`` gives a loaded model's Linear layers the packed bytes of their weight;
``PackedLinear.forward`` then uses them for inputs of at most ``MAX_ROWS`` rows on CPU in
float32 (decoding, short prompts) and the ordinary float32 matmul otherwise (long prompts,
training, GPUs, other dtypes). The float32 weight stays the parameter: state dicts, export
and training see nothing different, and a weight changed in place (training) or replaced
(``load_state_dict``, a new Parameter) drops its stale packed copy. Only a write into
``weight.data`` itself goes unseen; call ``drop_packed()`` after one.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt import _backend

Q4_1, Q8_0 = 3, 8          # ggml type codes (gguf.GGMLQuantizationType)
BLOCK_BYTES = {Q8_0: 34, Q4_1: 20}
# Up to this many rows the packed kernel beats the float32 matmul: measured on the 2-core
# Xeon with SmolLM2 prefills, 32 rows 41 vs 60 ms, 64 rows 81 vs 93 ms, 96 rows 119 vs 113 ms.
MAX_ROWS = 64
OP = "quant_matmul"


def dequantize(packed: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """Reference: packed (N, K/32 * bytes) uint8 -> float32 (N, K), in plain torch."""
    n = packed.shape[0]
    blocks = packed.reshape(n, k // 32, BLOCK_BYTES[qtype])
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()        # (N, nb, 1)
    if qtype == Q8_0:
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        w = d * q
    else:
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()
        qs = blocks[..., 4:].to(torch.int32)
        q = torch.cat([qs & 15, qs >> 4], dim=-1).float()
        w = d * q + m
    return w.reshape(n, k)


def quant_matmul(x: torch.Tensor, packed: torch.Tensor, qtype: int, n_out: int,
                 backend=None) -> torch.Tensor:
    """x (M, K) float32 @ W^T with W given as GGUF blocks: packed (n_out, K/32 * bytes) uint8.
    -> (M, n_out) float32. Backends: cpu (the C++ kernel), torch (dequantize, then F.linear)."""
    if not isinstance(x, torch.Tensor) or not isinstance(packed, torch.Tensor):
        raise TypeError(f"{OP}: x and packed must be tensors")
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"{OP}: qtype must be Q8_0 ({Q8_0}) or Q4_1 ({Q4_1}), got {qtype!r}")
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"{OP}: x must be a 2-D float32 tensor, got {x.dtype} {tuple(x.shape)}")
    K = x.shape[1]
    if K % 32 or packed.dtype != torch.uint8 or tuple(packed.shape) != (
            n_out, K // 32 * BLOCK_BYTES[qtype]):
        raise ValueError(f"{OP}: packed must be uint8 ({n_out}, {K // 32 * BLOCK_BYTES[qtype]}) "
                         f"for K = {K} (a multiple of 32), got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    be = _backend.resolve(OP, backend, x.device, x.dtype, supported=("cpu", "torch"))
    if be == "cpu":
        return _backend.extension().quant_matmul(x.contiguous(), packed.contiguous(), qtype,
                                                 n_out)
    return F.linear(x, dequantize(packed, qtype, K).to(x.device))


class PackedLinear(nn.Linear):
    """nn.Linear that, for decode-sized float32 CPU inputs, multiplies by the packed GGUF copy
    of its weight (see the module docstring)."""

    packed: torch.Tensor

    def set_packed(self, packed: torch.Tensor, qtype: int):
        self.register_buffer("packed", packed.contiguous(), persistent=False)
        self.qtype = qtype
        self._packed_for = self._weight_key()

    def _weight_key(self):
        # Which weight the bytes were taken from. The version counter alone missed a weight
        # replaced whole (load_state_dict(assign=True), a new Parameter: version 0 again) or
        # given new storage (weight.data = ..., module.half().float()). The Parameter by weak
        # reference (a replaced one is not kept alive by this), its storage by a strong one:
        # freed, the storage's address could come back for the new weight (.half().float()
        # allocates the same size again), and the address alone would then match.
        w = self.weight
        return weakref.ref(w), w.detach(), w._version

    def __getstate__(self):
        # A weakref neither pickles nor deep-copies to the copy's own weight: the copy (which
        # holds its packed bytes and weight together) takes a fresh key in __setstate__.
        state = super().__getstate__().copy()
        state.pop("_packed_for", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if getattr(self, "packed", None) is not None:
            self._packed_for = self._weight_key()

    def drop_packed(self):
        """Forget the packed copy; from now on the float32 weight is used for every input.
        Needed only after writing into ``weight.data`` in place, the one change autograd's
        version counter does not see."""
        if getattr(self, "packed", None) is not None:
            del self.packed
        self._packed_for = None  # nor the storage it was taken from

    def forward(self, x):
        p = getattr(self, "packed", None)
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if (p is not None and self.bias is None and x.dtype == torch.float32
                and x.device.type == "cpu" and p.device.type == "cpu" and 0 < rows <= MAX_ROWS
                and self.weight.dtype == torch.float32 and not torch.is_grad_enabled()
                and kernel_available()):
            ref, held, version = self._packed_for
            w = self.weight
            if ref() is not w or w.data_ptr() != held.data_ptr() or w._version != version:
                self.drop_packed()  # trained or replaced since: a stale copy
                return F.linear(x, w)
            # Straight to the kernel: shapes were checked when the bytes were attached, and a
            # decode step makes ~150 of these calls, so per-call Python checks add up.
            y = _backend._ext().quant_matmul(x.reshape(rows, x.shape[-1]).contiguous(), p,
                                             self.qtype, self.out_features)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def kernel_available() -> bool:
    """The C++ kernel can run and no other backend was asked for (MINIGPT_BACKEND=torch
    means the reference everywhere, and the reference of this op is just F.linear)."""
    if os.environ.get(_backend.ENV_VAR, "").strip().lower() not in ("", "cpu"):
        return False
    ext = _backend._ext()
    return not isinstance(ext, ImportError) and hasattr(ext, "quant_matmul")


def attach_packed(module: nn.Linear, packed: torch.Tensor, qtype: int) -> None:
    """Turn ``module`` into a PackedLinear holding ``packed`` (its weight, as GGUF blocks)."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"attach_packed: expected an nn.Linear, got {type(module).__name__}")
    if qtype not in BLOCK_BYTES or packed.dtype != torch.uint8 or module.in_features % 32:
        raise ValueError(f"attach_packed: needs uint8 Q8_0 ({Q8_0}) or Q4_1 ({Q4_1}) blocks of "
                         f"a weight with a multiple of 32 columns, got type {qtype!r}, "
                         f"{packed.dtype}, {module.in_features} columns")
    if tuple(packed.shape) != (module.out_features,
                               module.in_features // 32 * BLOCK_BYTES[qtype]):
        raise ValueError(f"attach_packed: packed {tuple(packed.shape)} does not fit a "
                         f"{module.out_features}x{module.in_features} weight")
    module.__class__ = PackedLinear  # same parameters and hooks; only forward changes
    module.set_packed(packed, qtype)
