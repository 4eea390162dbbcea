"""SwiGLU, silu(gate) * up, in Triton: elementwise over the flattened tensors, fp32 math.

Backward recomputes sigmoid(gate) instead of saving silu(gate): one more exp per element is
cheaper than another activation-sized buffer kept from forward to backward.
"""
import torch
import triton
import triton.language as tl

from minigpt.kernels._util import cdiv

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu / d g = sig * (1 + g * (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


def swiglu_fwd(gate, up):
    """gate, up: 1-D contiguous, same dtype. -> silu(gate) * up."""
    n = gate.numel()
    y = torch.empty_like(gate)
    _swiglu_fwd_kernel[(cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, num_warps=4)
    return y


def swiglu_bwd(dy, gate, up):
    """-> dgate, dup (gate's dtype)."""
    n = gate.numel()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    _swiglu_bwd_kernel[(cdiv(n, BLOCK),)](dy, gate, up, dg, du, n, BLOCK=BLOCK, num_warps=4)
    return dg, du
