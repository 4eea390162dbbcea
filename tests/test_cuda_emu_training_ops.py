"""csrc/rms_norm_cuda.cu, rope_cuda.cu, swiglu_cuda.cu and cross_entropy_cuda.cu run through the CPU CUDA emulator
(tests/cuda_emu), each launcher called as the WITH_CUDA branch of its csrc/<op>.cpp calls it
(scratch buffers, P partial rows, strides, table strides) with what minigpt/ops/<op>.py hands
that entry point, and compared with minigpt.reference: float64 truth and the reference in the
same dtype (tests/_tol.py). Inputs and outputs sit in NaN guard bands, so a read outside a
buffer poisons the result and a write outside one fails check_guards."""
import pytest
import torch

from minigpt import reference as R
from minigpt.ops.cross_entropy import _grad_scale, _reduce, _target_stats
from tests._tol import FLOOR, assert_close
from tests.cuda_emu import build as B

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
H100_SMS = 132


def _row_blocks(M, sms=H100_SMS):
    return max(1, min(M, 4 * sms))  # csrc/common.h row_blocks on a GPU with `sms` SMs


def _grads(fn, inputs, douts):
    """The reference's vector-Jacobian product: grads of sum(out * dout) w.r.t. inputs."""
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*ins)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, d) for o, d in zip(outs, douts) if d is not None]
    return outs, torch.autograd.grad([o for o, _ in pairs], ins,
                                     [d.to(o.dtype) for o, d in pairs])


# ---- RMSNorm --------------------------------------------------------------------------------

def rms_fwd(emu, x, w, r, eps):
    """csrc/rms_norm.cpp rms_norm_fwd: y, h (only with a residual), rstd (M,) fp32."""
    M, N = x.shape
    y = B.guarded_empty((M, N), x.dtype)
    h = B.guarded_empty((M, N), x.dtype) if r is not None else None
    rstd = B.guarded_empty((M,), torch.float32)
    emu.call("minigpt_rms_norm_fwd_cuda", B.guarded(x), None if r is None else B.guarded(r),
             B.guarded(w), y, h, rstd, M, N, eps, B.DTYPE_CODES[x.dtype], B.DTYPE_CODES[w.dtype],
             None)
    B.check_guards(*(t for t in (y, h, rstd) if t is not None))
    return y, h, rstd


def rms_bwd(emu, dy, dh, h, w, rstd, P, split=False):
    """csrc/rms_norm.cpp rms_norm_bwd: dx, and the P partial dweight rows summed. ``split``:
    dx written twice (see test_cuda_emu_spine_ops.ln_bwd), the same bits both times."""
    M, N = h.shape
    dx = B.guarded_empty((M, N), h.dtype)
    dx2 = B.guarded_empty((M, N), h.dtype) if split else None
    dw_part = B.guarded_empty((P, N), torch.float32)
    emu.call("minigpt_rms_norm_bwd_cuda", B.guarded(dy), None if dh is None else B.guarded(dh),
             B.guarded(h), B.guarded(w), B.guarded(rstd), dx, dx2, dw_part, M, N, P,
             B.DTYPE_CODES[h.dtype], B.DTYPE_CODES[w.dtype], None)
    B.check_guards(*(t for t in (dx, dx2, dw_part) if t is not None))
    if split:
        assert torch.equal(dx2, dx), "the second dx differs from the first"
    assert torch.isfinite(dw_part).all()  # every partial row is written, empty blocks as zeros
    return dx, dw_part.sum(0)


def _offset_by_one(t):
    """t's values at an address one element past a 16-byte boundary: the vectorized kernels
    must leave such a call to their generic versions."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _check_rms(emu, dtype, M, N, mode, P, eps=1e-6, misaligned=None, wdtype=torch.float32):
    residual, with_dh = mode in ("residual", "residual-dh"), mode == "residual-dh"
    x = torch.randn(M, N).to(dtype)
    r = torch.randn(M, N).to(dtype) if residual else None
    # ops/rms_norm.py hands the kernels the weight in fp32, or in 16-bit rows' own dtype
    w = torch.randn(N).to(wdtype)
    dy = torch.randn(M, N).to(dtype)
    dh = torch.randn(M, N).to(dtype) if with_dh else None

    def moved(t, name):
        return _offset_by_one(t) if misaligned == name else t

    y, h, rstd = rms_fwd(emu, moved(x, "x"), moved(w, "w"), moved(r, "residual"), eps)
    # ops/rms_norm.py saves h with a residual, else x (as handed to the forward); the gradient
    # of h only when it is used.
    saved = h if residual else moved(x, "x")
    dx, dw = rms_bwd(emu, moved(dy, "dy"), moved(dh, "dh"), saved, moved(w, "w"), rstd, P,
                     split=residual)

    def ref(xx, ww, *rr):
        return R.rms_norm(xx, ww, eps, rr[0] if rr else None)

    ins = [x, w] + ([r] if residual else [])
    (y64, *h64), g64 = _grads(ref, [t.double() for t in ins], [dy, dh])
    (ylo, *hlo), glo = _grads(ref, ins, [dy, dh])
    assert_close(y, y64, ylo, dtype, "y")
    if residual:
        assert torch.equal(h, x + r)  # the unfused add, rounded to the dtype
        assert_close(dx, g64[2], glo[2], dtype, "dresidual")
    hs = (h if residual else x).double()
    rstd64 = hs.pow(2).mean(-1).add(eps).rsqrt()
    rstd32 = (h if residual else x).float().pow(2).mean(-1).add(eps).rsqrt()
    assert_close(rstd, rstd64, rstd32, dtype, "rstd", floor=FLOOR[torch.float32])
    assert_close(dx, g64[0], glo[0], dtype, "dx")
    assert_close(dw, g64[1], glo[1].float(), dtype, "dweight")


# The vectorized kernels take rows of whole 16-byte packs (4 fp32 values, 8 fp16/bf16) with
# every pointer 16-byte aligned: the forward up to 16 values a thread at up to 1024 threads,
# the backward up to 32 at up to 256; the rest take the generic kernels. Packs a thread
# (forward / backward):
#   1, 7, 1025: generic (not whole packs).
#   128: 1 / 1 (fp16/bf16: 16 packs on 32 threads, half of them idle).
#   1000: 2 / 2, the last threads' second pack past N.
#   4096: 2 / fp32 4, fp16/bf16 2.    8192: 2 / fp32 8, fp16/bf16 4.
#   16384: fp32 4, fp16/bf16 2 / generic (past the backward's 32 values a thread).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N", [(1, 1), (5, 7), (3, 128), (3, 1000), (4, 1025), (600, 7),
                                 (5, 4096), (3, 8192), (2, 16384)])
@pytest.mark.parametrize("mode", ["plain", "residual", "residual-dh"])
def test_rms_norm(cuda_emu, dtype, M, N, mode):
    # (600, 7): P = 528 blocks on an H100, two rows in most, the last 228 blocks empty.
    _check_rms(cuda_emu, dtype, M, N, mode, _row_blocks(M))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["plain", "residual-dh"])
def test_rms_norm_eps(cuda_emu, dtype, mode):
    # eps comparable to mean(x^2) (1e-6 is lost next to unit rows): it must enter as given.
    _check_rms(cuda_emu, dtype, 3, 33, mode, 3, eps=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,sms", [(7, 1), (9, 2)], ids=["P4-7rows", "P8-9rows"])
@pytest.mark.parametrize("N", [40, 41, 1000], ids=["vec-40", "generic-41", "vec-1000"])
@pytest.mark.parametrize("mode", ["plain", "residual-dh"])
def test_rms_norm_bwd_several_rows_per_block(cuda_emu, dtype, M, sms, N, mode):
    # row_blocks on a GPU with few SMs: 2 rows per block and a short last block (7 rows in 4),
    # or 2 rows per block and blocks 5..7 with no rows (9 rows in 8). The vectorized kernel
    # carries its dweight sums in registers from row to row and stores them once.
    _check_rms(cuda_emu, dtype, M, N, mode, _row_blocks(M, sms))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,P", [(37, 64, 2), (21, 512, 2), (45, 1000, 3), (9, 200, 4)],
                         ids=["warp-64", "warp-512", "warp-1000", "warp-200-short"])
@pytest.mark.parametrize("mode", ["plain", "residual-dh"])
def test_rms_norm_bwd_warp_per_row(cuda_emu, dtype, M, N, P, mode):
    # Rows of at most 128 packs take the warp-per-row backward (fp32 up to 512 wide, fp16/bf16
    # up to 1024): 8 warps a block, warp k on rows k, k + 8, ... of the block's slice. 37 rows
    # in 2 blocks: 19 and 18 rows, so warps walk 2-3 rows and carry their dweight sums across
    # them; 9 rows in 4 blocks: 3, 3, 3 and 0 rows, most warps idle, the last block empty.
    _check_rms(cuda_emu, dtype, M, N, mode, P)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which,mode", [("x", "plain"), ("x", "residual-dh"),
                                        ("residual", "residual-dh"), ("w", "residual-dh"),
                                        ("dy", "plain"), ("dy", "residual-dh"),
                                        ("dh", "residual-dh")])
def test_rms_norm_misaligned(cuda_emu, dtype, which, mode):
    # One element off a 16-byte boundary: the calls given it take the generic kernels (x: both,
    # as h is x without a residual; residual: the forward; dy, dh: the backward); a vectorized
    # kernel given it fails the launch (the emulator's alignment check). 5 rows in 2 blocks.
    _check_rms(cuda_emu, dtype, 5, 1000, mode, 2, misaligned=which)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,N,P", [(5, 7, 3), (3, 1000, 3), (5, 4096, 3), (3, 8192, 2),
                                   (37, 64, 2)],
                         ids=["generic", "vec-1000", "vec-4096", "vec-8192", "warp-64"])
@pytest.mark.parametrize("mode", ["plain", "residual-dh"])
def test_rms_norm_16bit_weight(cuda_emu, dtype, M, N, P, mode):
    # A bf16 model's RMSNorm: the weight in the rows' dtype, read as it is (W = T).
    _check_rms(cuda_emu, dtype, M, N, mode, P, wdtype=dtype)


def test_rms_norm_refuses_other_weight_dtypes(cuda_emu):
    x, w = torch.randn(4, 64), torch.randn(64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="error 1"):  # cudaErrorInvalidValue
        rms_fwd(cuda_emu, x, w, None, 1e-6)
    with pytest.raises(RuntimeError, match="error 1"):
        rms_bwd(cuda_emu, x, None, x, w, torch.ones(4), 2)


# ---- RoPE -----------------------------------------------------------------------------------

def rope_call(emu, q, k, cos, sin, position_ids, inverse):
    """What ops/rope.py and csrc/rope.cpp hand minigpt_rope_cuda."""
    # ops/rope.py: (1, T) positions and (1, T, D) tables lose their batch dim; tables go
    # contiguous; q/k keep their strides when the last one is 1.
    pos = None
    if position_ids is not None:
        pos = position_ids.to(torch.int64)
        pos = (pos[0] if pos.dim() == 2 and pos.shape[0] == 1 else pos).contiguous()
    elif cos.dim() == 3 and cos.shape[0] == 1:
        cos, sin = cos[0], sin[0]
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    # csrc/rope.cpp
    Bn, Hq, T, D = q.shape
    Hk = k.shape[1]
    if pos is not None:
        cos_bstride, pos_bstride = 0, (T if pos.dim() == 2 else 0)
    else:
        cos_bstride, pos_bstride = (T * D if cos.dim() == 3 else 0), 0
    qg, kg = B.guarded(q), B.guarded(k)  # same strides, NaN around
    assert qg.stride() == q.stride() and kg.stride() == k.stride()
    qo = B.guarded_empty(tuple(q.shape), q.dtype)
    ko = B.guarded_empty(tuple(k.shape), k.dtype)
    emu.call("minigpt_rope_cuda", qg, kg, qo, ko, B.guarded(cos), B.guarded(sin),
             None if pos is None else B.guarded(pos), Bn, Hq, Hk, T, D, *q.stride()[:3],
             *k.stride()[:3], cos_bstride, pos_bstride, cos.shape[0], 1 if inverse else 0,
             B.DTYPE_CODES[q.dtype], None)
    B.check_guards(qo, ko)
    return qo, ko


def _strided(shape, dtype, how):
    """(B, H, T, D) with unit last stride: contiguous, a transpose of (B, T, H, D) (the
    attention layout before .transpose(1, 2)), or a column slice of a wider buffer (a fused
    projection)."""
    Bn, H, T, D = shape
    if how == "contig":
        return torch.randn(shape).to(dtype)
    if how == "transposed":
        t = torch.randn(Bn, T, H, D).to(dtype).transpose(1, 2)
    else:
        t = torch.randn(Bn, H, T, D + 6).to(dtype)[..., 2:2 + D]
    assert t.stride(-1) == 1
    return t


# (B, Hq, Hk, T, D, q layout, k layout, table): "shared" (T, D); "batch" (B, T, D); "batch1"
# (1, T, D); "pos" (T,) positions into an (L, D) table (decoding after a cache of 5);
# "pos-b" (B, T) positions, a different cache length per sequence; "pos-1" (1, T).
ROPE_CASES = [
    pytest.param(2, 4, 2, 7, 10, "contig", "contig", "shared", id="gqa2-D10-shared"),
    pytest.param(2, 3, 1, 5, 6, "transposed", "sliced", "batch", id="gqa3-strided-batch"),
    pytest.param(1, 1, 3, 1, 2, "sliced", "transposed", "batch1", id="Hk>Hq-D2-T1-batch1"),
    pytest.param(2, 8, 2, 3, 72, "transposed", "transposed", "shared", id="work>threads"),
    pytest.param(3, 4, 2, 4, 48, "contig", "sliced", "pos", id="pos-T-64threads"),
    pytest.param(3, 4, 1, 1, 12, "sliced", "transposed", "pos-b", id="decode-pos-BT"),
    pytest.param(2, 2, 2, 6, 8, "sliced", "sliced", "pos-1", id="pos-1T"),
]


def _rope_tables(kind, Bn, T, D, L=20):
    """Random tables whose halves differ (a real table repeats them), so a kernel mixing up
    c1/c2 or s1/s2 shows; and the position ids."""
    if kind.startswith("pos"):
        cos, sin = torch.randn(L, D), torch.randn(L, D)
        if kind == "pos":
            pos = torch.arange(5, 5 + T)
        elif kind == "pos-b":
            pos = torch.tensor([[3 + 7 * b + t for t in range(T)] for b in range(Bn)])
        else:
            pos = torch.randint(0, L, (1, T))
        return cos, sin, pos
    lead = {"shared": (), "batch": (Bn,), "batch1": (1,)}[kind]
    return torch.randn(*lead, T, D), torch.randn(*lead, T, D), None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Bn,Hq,Hk,T,D,qlay,klay,table", ROPE_CASES)
def test_rope(cuda_emu, dtype, Bn, Hq, Hk, T, D, qlay, klay, table):
    q = _strided((Bn, Hq, T, D), dtype, qlay)
    k = _strided((Bn, Hk, T, D), dtype, klay)
    cos, sin, pos = _rope_tables(table, Bn, T, D)

    # Forward: ops/rope.py passes inverse=False.
    qo, ko = rope_call(cuda_emu, q, k, cos, sin, pos, False)
    q64, k64 = R.rope(q.double(), k.double(), cos.double(), sin.double(), pos)
    qlo, klo = R.rope(q, k, cos, sin, pos)
    assert_close(qo, q64, qlo, dtype, "q_rot")
    assert_close(ko, k64, klo, dtype, "k_rot")

    # Backward: ops/rope.py runs the same op on the incoming gradients (strided as they come)
    # with inverse=True; the truth is the reference's own vector-Jacobian product.
    dq = _strided((Bn, Hq, T, D), dtype, klay)
    dk = _strided((Bn, Hk, T, D), dtype, qlay)
    gq, gk = rope_call(cuda_emu, dq, dk, cos, sin, pos, True)

    def ref(qq, kk):
        return R.rope(qq, kk, cos, sin, pos)  # fp32 tables: exact in the float64 run too

    _, g64 = _grads(ref, [q.double(), k.double()], [dq, dk])
    _, glo = _grads(ref, [q, k], [dq, dk])
    assert_close(gq, g64[0], glo[0], dtype, "dq")
    assert_close(gk, g64[1], glo[1], dtype, "dk")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inverse"])
def test_rope_out_of_range_positions_read_nothing(cuda_emu, dtype, inverse):
    # On CUDA ops/rope.py does not check positions (a host sync); the kernel must not read
    # outside the (L, D) table for them. It rotates by c = s = 0 there: zeros. The tables sit
    # in NaN guard bands, so a read past either end would show as NaN.
    Bn, Hq, Hk, T, D, L = 2, 3, 1, 4, 8, 6
    q, k = torch.randn(Bn, Hq, T, D).to(dtype), torch.randn(Bn, Hk, T, D).to(dtype)
    cos, sin = torch.randn(L, D), torch.randn(L, D)
    pos = torch.tensor([[0, L, 5, -1], [L + 1000, 2, -(2 ** 40), L - 1]])
    qo, ko = rope_call(cuda_emu, q, k, cos, sin, pos, inverse)
    bad = (pos < 0) | (pos >= L)
    for out in (qo, ko):
        assert (out.permute(0, 2, 1, 3)[bad] == 0).all()
    ok = pos.clamp(0, L - 1)  # what the in-range rows are rotated by
    if inverse:
        def rot(a, b):
            return R.rope(a, b, cos, sin, ok)
        _, ref64 = _grads(rot, [q.double(), k.double()], [q, k])
        _, reflo = _grads(rot, [q, k], [q, k])
    else:
        ref64 = R.rope(q.double(), k.double(), cos.double(), sin.double(), ok)
        reflo = R.rope(q, k, cos, sin, ok)
    keep = (~bad)[:, None, :, None]
    for out, r64, rlo, name in zip((qo, ko), ref64, reflo, ("q", "k")):
        m = keep.expand_as(out)
        assert_close(out[m], r64[m], rlo[m], dtype, f"{name} at in-range positions")


# ---- SwiGLU ---------------------------------------------------------------------------------

SWIGLU_GRID = 65536 * 256  # swiglu_cuda.cu grid_for caps the grid at 65536 blocks of 256 threads


# Aligned pointers take 16-byte packs (8 bf16/fp16 or 4 fp32 values) and a scalar tail: 7 is
# all tail for 16-bit types, 1025 one value past the packs; "misaligned" (gate one element
# past a 16-byte boundary) is all scalar.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,misaligned", [(1, False), (7, False), (1000, False), (1025, False),
                                          (1025, True), (SWIGLU_GRID + 1000, False)],
                         ids=["1", "7", "1000", "1025", "1025-misaligned", "over-one-grid"])
def test_swiglu(cuda_emu, dtype, n, misaligned):
    gate = (torch.randn(n) * 3).to(dtype)
    gate[:4] = torch.tensor([-90.0, -20.0, 20.0, 90.0])[:n].to(dtype)  # sigmoid saturated
    up = torch.randn(n).to(dtype)
    dy = torch.randn(n).to(dtype)
    code = B.DTYPE_CODES[dtype]
    g_in = _offset_by_one(gate) if misaligned else B.guarded(gate)

    y = B.guarded_empty((n,), dtype)
    cuda_emu.call("minigpt_swiglu_fwd_cuda", g_in, B.guarded(up), y, n, code, None)
    dg, du = B.guarded_empty((n,), dtype), B.guarded_empty((n,), dtype)
    cuda_emu.call("minigpt_swiglu_bwd_cuda", B.guarded(dy), g_in, B.guarded(up), dg,
                  du, n, code, None)
    B.check_guards(y, dg, du)

    if n > SWIGLU_GRID:
        # Every element written (the outputs start as NaN); values compared where the first
        # threads work, once in the first pass and again past one grid's worth (elementwise,
        # so a slice of the reference is the reference of the slice; the whole 16M-element
        # float64 reference would double the test's time).
        for out in (y, dg, du):
            assert torch.isfinite(out).all()
        idx = torch.cat([torch.arange(0, 2000), torch.arange(SWIGLU_GRID - 1000, n)])
        gate, up, dy, y, dg, du = (t[idx] for t in (gate, up, dy, y, dg, du))
    (y64,), g64 = _grads(R.swiglu, [gate.double(), up.double()], [dy])
    (ylo,), glo = _grads(R.swiglu, [gate, up], [dy])
    assert_close(y, y64, ylo, dtype, "y")
    assert_close(dg, g64[0], glo[0], dtype, "dgate")
    assert_close(du, g64[1], glo[1], dtype, "dup")


# ---- cross-entropy --------------------------------------------------------------------------

def ce_call(emu, logits, target, grad_mode, ignore_index, label_smoothing, grad_scale):
    """csrc/cross_entropy.cpp cross_entropy_fwd: loss (M,) fp32; grad_mode "none" (null),
    "buffer" (a fresh (M, V) buffer, as ops/cross_entropy.py's cross_entropy) or "inplace"
    (grad is logits, as fused_linear_cross_entropy uses it)."""
    M, V = logits.shape
    x = B.guarded(logits)
    grad = {"none": None, "buffer": B.guarded_empty((M, V), logits.dtype), "inplace": x}[grad_mode]
    loss = B.guarded_empty((M,), torch.float32)
    emu.call("minigpt_cross_entropy_fwd_cuda", x, B.guarded(target), grad, loss, M, V,
             ignore_index, label_smoothing, grad_scale, B.DTYPE_CODES[logits.dtype], None)
    B.check_guards(*(t for t in (x, grad, loss) if t is not None))
    if grad_mode == "none":
        assert torch.equal(x.view(torch.int16 if x.element_size() == 2 else torch.int32),
                           logits.view(torch.int16 if x.element_size() == 2 else torch.int32))
    return loss, grad


def _ce_ref(logits, target, ignore_index, eps, scale):
    def f(x):
        return R.cross_entropy(x, target, ignore_index, "none", eps)
    (loss,), (g,) = _grads(f, [logits], [torch.full(target.shape, scale, dtype=torch.float64)])
    return loss, g


def _check_ce(emu, dtype, logits, target, grad_mode, ignore_index, eps, reduction):
    # ops/cross_entropy.py: count the non-ignored targets, the gradient scale for the reduction.
    V = logits.shape[1]
    n_valid = _target_stats("cross_entropy", target, V, ignore_index)
    scale = _grad_scale(reduction, n_valid)
    loss, grad = ce_call(emu, logits, target, grad_mode, ignore_index, eps, scale)
    l64, g64 = _ce_ref(logits.double(), target, ignore_index, eps, scale)
    llo, glo = _ce_ref(logits, target, ignore_index, eps, scale)
    inf = torch.isinf(l64)
    assert torch.equal(torch.isinf(loss), inf) and torch.equal(torch.isinf(llo), inf)
    assert (loss[inf] > 0).all()
    # The loss is fp32 math on the dtype's values: hold it to the fp32 floor.
    assert_close(loss[~inf], l64[~inf], llo[~inf], dtype, "loss", floor=FLOOR[torch.float32])
    ignored = target == ignore_index
    assert (loss[ignored] == 0).all()
    if not inf.any():
        assert_close(_reduce(loss, reduction, n_valid),
                     R.cross_entropy(logits.double(), target, ignore_index, reduction, eps),
                     R.cross_entropy(logits, target, ignore_index, reduction, eps), dtype,
                     f"{reduction} loss", floor=FLOOR[torch.float32])
    if grad_mode != "none":
        assert (grad[ignored] == 0).all()
        assert_close(grad, g64, glo, dtype, "grad")


def _logits(M, V, dtype, offset=0.0):
    return (torch.randn(M, V) * 3 + offset).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 1000, 1025])
@pytest.mark.parametrize("grad_mode", ["none", "buffer", "inplace"])
@pytest.mark.parametrize("eps,reduction", [(0.0, "mean"), (0.1, "sum")], ids=["mean", "smooth-sum"])
def test_cross_entropy(cuda_emu, dtype, V, grad_mode, eps, reduction):
    M = 5
    logits = _logits(M, V, dtype, offset=40.0)  # large logits: x - lse would lose low bits
    target = torch.randint(0, V, (M,))
    target[1] = -100  # an ignored row
    _check_ce(cuda_emu, dtype, logits, target, grad_mode, -100, eps, reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_mode", ["buffer", "inplace"])
def test_cross_entropy_ignore_index_is_a_class(cuda_emu, dtype, grad_mode):
    # ignore_index inside [0, V): those rows are ignored, not scored as class 2.
    logits = _logits(6, 7, dtype)
    target = torch.tensor([2, 0, 2, 6, 5, 2])
    _check_ce(cuda_emu, dtype, logits, target, grad_mode, 2, 0.0, "mean")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_mode", ["none", "inplace"])
def test_cross_entropy_all_ignored(cuda_emu, dtype, grad_mode):
    logits = _logits(3, 33, dtype)
    target = torch.full((3,), -100)
    n_valid = _target_stats("cross_entropy", target, 33, -100)
    loss, grad = ce_call(cuda_emu, logits, target, grad_mode, -100, 0.0,
                         _grad_scale("mean", n_valid))
    assert (loss == 0).all()
    if grad is not None:
        assert (grad == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 1025])
@pytest.mark.parametrize("eps", [0.0, 0.2], ids=["plain", "smooth"])
def test_cross_entropy_masked_logits(cuda_emu, dtype, V, eps):
    # -inf logits (masked classes). V = 1025 on 1024 threads: thread 0 owns columns 0 and 1024;
    # row 0 gives it only -inf (its sum must count as 0, not NaN), row 1 -inf before a finite
    # value (its running max starts at -inf). With label smoothing the loss is +inf, as in
    # torch, and the gradient stays finite.
    M = 4
    logits = _logits(M, V, dtype)
    target = torch.randint(1, V - 1, (M,))
    cols = torch.arange(V)
    logits[0, [0, V - 1]] = float("-inf")  # thread 0: only -inf
    logits[1, 0] = float("-inf")  # thread 0: -inf first, then a finite value
    logits[2, cols % 3 == 0] = float("-inf")
    logits[2, target[2]] = 1.0
    logits[3, cols % 2 == 0] = float("-inf")
    target[3] = -100
    _check_ce(cuda_emu, dtype, logits, target, "inplace", -100, eps, "mean")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_out_of_range_target_reads_nothing(cuda_emu, dtype):
    # ops/cross_entropy.py raises before launching; the kernel itself must stay inside the row:
    # NaN loss, zero gradient.
    logits = _logits(3, 7, dtype)
    target = torch.tensor([7, -1, 3])
    loss, grad = ce_call(cuda_emu, logits, target, "buffer", -100, 0.0, 1.0)
    assert torch.isnan(loss[:2]).all() and (grad[:2] == 0).all()
    l64, g64 = _ce_ref(logits[2:].double(), target[2:], -100, 0.0, 1.0)
    llo, glo = _ce_ref(logits[2:], target[2:], -100, 0.0, 1.0)
    assert_close(loss[2:], l64, llo, dtype, "loss", floor=FLOOR[torch.float32])
    assert_close(grad[2:], g64, glo, dtype, "grad")
