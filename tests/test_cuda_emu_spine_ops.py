"""csrc/layer_norm_cuda.cu and csrc/softmax_cuda.cu run through the CPU CUDA emulator (tests/cuda_emu),
called as the WITH_CUDA branches of csrc/layer_norm.cpp and csrc/softmax.cpp call them, against
the reference: forward and backward, every dtype, odd widths, every branch of the kernels."""
import pytest
import torch

from minigpt import reference as R
from tests._tol import assert_close
from tests.cuda_emu import build as B

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
H100_SMS = 132


def _p_rows(M):
    return max(1, min(M, 4 * H100_SMS))  # csrc/common.h row_blocks on a GPU


def ln_fwd(emu, x, w, b, r, eps=1e-5):
    M, N = x.shape
    y = B.guarded_empty((M, N), x.dtype)
    h = B.guarded_empty((M, N), x.dtype) if r is not None else None
    mean = B.guarded_empty((M,), torch.float32)
    rstd = B.guarded_empty((M,), torch.float32)
    emu.call("minigpt_layer_norm_fwd_cuda", B.guarded(x), None if r is None else B.guarded(r),
             B.guarded(w), None if b is None else B.guarded(b), y, h, mean, rstd, M, N, eps,
             B.DTYPE_CODES[x.dtype], B.DTYPE_CODES[w.dtype], None)
    B.check_guards(*(t for t in (y, h, mean, rstd) if t is not None))
    return y, (h if r is not None else x), mean, rstd


def ln_bwd(emu, dy, dh, h, w, mean, rstd, has_bias, P, split=False):
    """``split``: the kernel writes dx a second time, into x's own buffer (ops/layer_norm.py
    when x and the residual are both leaves); it must hold the same bits."""
    M, N = h.shape
    dx = B.guarded_empty((M, N), h.dtype)
    dx2 = B.guarded_empty((M, N), h.dtype) if split else None
    dw_part = B.guarded_empty((P, N), torch.float32)
    db_part = B.guarded_empty((P, N), torch.float32) if has_bias else None
    emu.call("minigpt_layer_norm_bwd_cuda", B.guarded(dy), None if dh is None else B.guarded(dh),
             B.guarded(h), B.guarded(w), B.guarded(mean), B.guarded(rstd), dx, dx2, dw_part,
             db_part, M, N, P, B.DTYPE_CODES[h.dtype], B.DTYPE_CODES[w.dtype], None)
    B.check_guards(*(t for t in (dx, dx2, dw_part, db_part) if t is not None))
    if split:
        assert torch.equal(dx2, dx), "the second dx differs from the first"
    return dx, dw_part.sum(0), (db_part.sum(0) if has_bias else None)


def _offset_by_one(t):
    """t's values at an address one element past a 16-byte boundary: the vectorized kernels
    must fall back to their generic versions."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


# Widths: odd ones for the generic kernels; whole 16-byte packs (1000, 4096, 8192) for the
# vectorized ones at one, two and four packs a thread; 16384 vectorized forward, generic backward.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N", [(1, 1), (3, 7), (2, 1000), (5, 1025), (2, 4097), (5, 4096),
                                 (3, 8192), (2, 16384)])
@pytest.mark.parametrize("residual,bias", [(False, True), (True, False), (True, True)],
                         ids=["plain", "residual-nobias", "residual-bias"])
def test_layer_norm_cuda_emulated(cuda_emu, dtype, M, N, residual, bias):
    _check_layer_norm(cuda_emu, dtype, M, N, residual, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["x", "residual"])
def test_layer_norm_cuda_emulated_misaligned(cuda_emu, dtype, which):
    _check_layer_norm(cuda_emu, dtype, 3, 1000, True, True, misaligned=which)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,P", [(37, 64, 2), (21, 512, 2), (45, 1000, 3), (9, 200, 4)],
                         ids=["warp-64", "warp-512", "warp-1000", "warp-200-short"])
@pytest.mark.parametrize("residual,bias", [(False, True), (True, False)],
                         ids=["plain", "residual-nobias"])
def test_layer_norm_cuda_emulated_warp_per_row(cuda_emu, dtype, M, N, P, residual, bias):
    # Rows of at most 128 packs take the warp-per-row backward (fp32 up to 512 wide, fp16/bf16
    # up to 1024): 8 warps a block, warp k on rows k, k + 8, ... of the block's slice. 37 rows
    # in 2 blocks: warps walk 2-3 rows and carry their dweight/dbias sums across them; 9 rows
    # in 4 blocks: 3, 3, 3 and 0 rows, most warps idle, the last block empty.
    _check_layer_norm(cuda_emu, dtype, M, N, residual, bias, P=P)


# fp32 rows of 8 packs a thread (4097 to 8192 wide) take the backward that keeps its dweight and
# dbias sums in registers (the faster on an H100); with MINIGPT_CUDA_LN_BWD_SUMS=shared, the
# one that keeps them in shared memory (ln_bwd_vec_smem_kernel: two blocks an SM), for timing
# the two side by side. 7 rows in 2 blocks: sums carried over 4 rows and 3. 4100 wide: the last pack
# column only partly used (1025 packs on 256 threads), sums under the 48 KiB default.
@pytest.mark.parametrize("sums", ["shared", "registers"])
@pytest.mark.parametrize("N", [4100, 8192])
@pytest.mark.parametrize("residual,bias", [(False, True), (True, False), (True, True)],
                         ids=["plain", "residual-nobias", "residual-bias"])
def test_layer_norm_cuda_emulated_backward_sums(cuda_emu, monkeypatch, sums, N, residual, bias):
    if sums == "shared":
        monkeypatch.setenv("MINIGPT_CUDA_LN_BWD_SUMS", "shared")
    else:
        monkeypatch.delenv("MINIGPT_CUDA_LN_BWD_SUMS", raising=False)
    _check_layer_norm(cuda_emu, torch.float32, 7, N, residual, bias, P=2)
    smem = (2 if bias else 1) * N * 4 if sums == "shared" else 0
    assert cuda_emu.launches()[-1] == (2, 1, 1, 256, smem)


# The emulated GPU has 3 SMs (tests/cuda_emu/cuda_runtime.h): the persistent forward (16-bit
# rows, w and b in shared memory) takes a grid of 3 x blocks-per-SM and each block loops over
# rows; it is used once there are two rows per block. 8192 wide: 512 threads, 3 blocks an SM
# by shared memory with a bias (64 KiB each: 9 blocks, 20 rows of 3 and 2 a block), 4 by
# threads without (12 blocks); 1000 wide: 64 threads, 25 blocks an SM by shared memory with a
# bias (8 KiB each), 32 (the cap) without.
PERSIST = [(20, 8192, True, 9), (30, 8192, False, 12), (151, 1000, True, 75),
           (200, 1000, False, 96)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,N,bias,grid", PERSIST, ids=lambda v: str(v))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_cuda_emulated_persistent_forward(cuda_emu, dtype, M, N, bias, grid,
                                                     residual):
    x = torch.randn(M, N).to(dtype)
    r = torch.randn(M, N).to(dtype) if residual else None
    w = torch.randn(N)
    b = torch.randn(N) if bias else None
    y, h, mean, rstd = ln_fwd(cuda_emu, x, w, b, r)
    assert cuda_emu.last_launch() == (grid, (2 if bias else 1) * N * 4)
    hh = x + r if residual else x
    if residual:
        assert torch.equal(h, hh)
    y64 = R.layer_norm(hh.double(), w.double(), None if b is None else b.double())
    ylo = R.layer_norm(hh, w, b)
    assert_close(y, y64, ylo, dtype, "y")
    torch.testing.assert_close(mean, hh.float().mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(hh.float().var(-1, unbiased=False) + 1e-5),
                               atol=1e-4, rtol=1e-4)
    # One row fewer than two a block: the one-row-a-block kernel (grid M, no shared memory).
    ln_fwd(cuda_emu, x[:2 * grid - 1], w, b, None if r is None else r[:2 * grid - 1])
    assert cuda_emu.last_launch() == (2 * grid - 1, 0)


def _check_layer_norm(cuda_emu, dtype, M, N, residual, bias, misaligned=None, P=None,
                      wdtype=torch.float32):
    x = torch.randn(M, N).to(dtype)
    r = torch.randn(M, N).to(dtype) if residual else None
    w = torch.randn(N).to(wdtype)
    b = torch.randn(N).to(wdtype) if bias else None
    gy = torch.randn(M, N).to(dtype)
    gh = torch.randn(M, N).to(dtype) if residual else None

    xin, rin = x, r
    if misaligned == "x":
        xin = _offset_by_one(x)
    elif misaligned == "residual":
        rin = _offset_by_one(r)
    y, h, mean, rstd = ln_fwd(cuda_emu, xin, w, b, rin)
    if P is None:
        P = _p_rows(M) if M < 3 else 2  # also several rows per block (M=5 -> 3 rows, then 2)
    dx, dw, db = ln_bwd(cuda_emu, gy, gh, h, w, mean, rstd, bias, P, split=residual)

    def run(xx, rr, ww, bb):
        ins = [t for t in (xx, rr, ww, bb) if t is not None]
        for t in ins:
            t.requires_grad_(True)
        out = R.layer_norm(xx, ww, bb, residual=rr)
        yy, hh = out if rr is not None else (out, None)
        loss = (yy.double() * gy.double()).sum()
        if hh is not None:
            loss = loss + (hh.double() * gh.double()).sum()
        grads = torch.autograd.grad(loss, ins)
        return yy, hh, dict(zip(["x", "r", "w", "b"][:4], _spread(grads, xx, rr, ww, bb)))

    y64, h64, g64 = run(*(t.double() if t is not None else None for t in (x, r, w, b)))
    ylo, hlo, glo = run(x.clone(), None if r is None else r.clone(), w.clone(),
                        None if b is None else b.clone())
    assert_close(y, y64, ylo, dtype, "y")
    if residual:
        assert torch.equal(h, (x + r))  # h is the dtype-rounded sum, exactly
        assert_close(dx, g64["r"], glo["r"].to(dtype), dtype, "dresidual")
    assert_close(dx, g64["x"], glo["x"].to(dtype), dtype, "dx")
    # dweight/dbias sum M rows in fp32: the floor scales with their magnitude.
    assert_close(dw, g64["w"], glo["w"].float(), torch.float32, "dw",
                 floor=1e-5 if dtype == torch.float32 else 2e-3)
    if bias:
        assert_close(db, g64["b"], glo["b"].float(), torch.float32, "db",
                     floor=1e-5 if dtype == torch.float32 else 2e-3)
    torch.testing.assert_close(mean, h.float().mean(-1), atol=1e-5, rtol=1e-5)


# 16-bit rows with weights in their own dtype (a bf16 model's LayerNorm), read as they are
# (W = T in csrc/layer_norm_cuda.cu): the generic, vectorized, warp-per-row backward and
# persistent forward kernels.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,N,P", [(3, 7, None), (2, 1000, None), (5, 4096, None),
                                   (3, 8192, None), (37, 64, 2), (151, 1000, 4)],
                         ids=["generic", "vec-1000", "vec-4096", "vec-8192", "warp-64",
                              "persistent-1000"])
@pytest.mark.parametrize("residual,bias", [(False, True), (True, True), (True, False)],
                         ids=["plain", "residual-bias", "residual-nobias"])
def test_layer_norm_cuda_emulated_16bit_weights(cuda_emu, dtype, M, N, P, residual, bias):
    _check_layer_norm(cuda_emu, dtype, M, N, residual, bias, P=P, wdtype=dtype)


@pytest.mark.parametrize("xdtype,wdtype", [(torch.float32, torch.bfloat16),
                                           (torch.bfloat16, torch.float16)], ids=str)
def test_layer_norm_cuda_refuses_other_weight_dtypes(cuda_emu, xdtype, wdtype):
    x, w = torch.randn(4, 64).to(xdtype), torch.randn(64).to(wdtype)
    with pytest.raises(RuntimeError, match="error 1"):  # cudaErrorInvalidValue
        ln_fwd(cuda_emu, x, w, None, None)
    mean, rstd = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="error 1"):
        ln_bwd(cuda_emu, x, None, x, w, mean, rstd, False, 2)


def _spread(grads, *ins):
    it = iter(grads)
    return [next(it) if t is not None else None for t in ins]


def sm_fwd(emu, x, scale, causal, T):
    M, N = x.shape
    y = B.guarded_empty((M, N), x.dtype)
    emu.call("minigpt_softmax_fwd_cuda", B.guarded(x), y, M, N, scale, int(causal),
             T if causal else 1, B.DTYPE_CODES[x.dtype], None)
    B.check_guards(y)
    return y


def sm_bwd(emu, dy, y, scale):
    M, N = y.shape
    dx = B.guarded_empty((M, N), y.dtype)
    emu.call("minigpt_softmax_bwd_cuda", B.guarded(dy), B.guarded(y), dx, M, N, scale,
             B.DTYPE_CODES[y.dtype], None)
    B.check_guards(dx)
    return dx


def _assert_rows_close(out, ref64, ref_lowp, y64, dtype, name):
    """assert_close on each row divided by the row's largest reference probability: a wide
    row's y and dx are ~1/N, far under the fp16/bf16 floor, which would let anything pass."""
    peak = y64.amax(-1, keepdim=True)
    s = torch.where(peak > 0, 1.0 / peak, torch.ones_like(peak))
    assert_close(out.double() * s, ref64 * s, ref_lowp.double() * s, dtype, name)


def _check_softmax(emu, dtype, x, causal, misaligned=None, scale=0.7):
    shape, N = x.shape, x.shape[-1]
    gy = torch.randn(shape).to(dtype)
    T = shape[-2] if causal else 1
    xin = _offset_by_one(x) if misaligned == "x" else x
    y = sm_fwd(emu, xin.reshape(-1, N), scale, causal, T).view(shape)
    yin = _offset_by_one(y) if misaligned == "y" else y
    gin = _offset_by_one(gy) if misaligned == "dy" else gy
    dx = sm_bwd(emu, gin.reshape(-1, N), yin.reshape(-1, N), scale).view(shape)

    def run(xx):
        xx = xx.detach().requires_grad_(True)
        yy = R.softmax(xx, scale=scale, causal=causal)
        (g,) = torch.autograd.grad((yy.double() * gy.double()).sum(), xx)
        # A row of -inf inputs is constant zeros, so its gradient is 0; autograd gives NaN
        # (softmax's backward through its NaN before the masked_fill).
        return yy, g.masked_fill((yy == 0).all(-1, keepdim=True), 0.0)

    y64, g64 = run(x.double())
    ylo, glo = run(x.clone())
    y64 = y64.detach()
    _assert_rows_close(y, y64, ylo, y64, dtype, "y")
    _assert_rows_close(dx, g64, glo.to(dtype), y64, dtype, "dx")
    # Causal: columns past L = i + N - T + 1 are exact zeros, and query rows that see no key
    # (T > N) are all zeros, not 0/0.
    if causal:
        i, j = torch.arange(T)[:, None], torch.arange(N)[None, :]
        kept = j < i + N - T + 1
        assert (y[..., ~kept] == 0).all() and (dx[..., ~kept] == 0).all()
    return y, dx


# The vectorized kernels take aligned rows of whole 16-byte packs (4 fp32, 8 fp16/bf16 values)
# up to 16 values a thread at up to 1024 threads; the rest take the generic ones.
#   generic everywhere: 1, 7, 1025, 4097 (not whole packs); 16392 (one pack past the limit:
#     fp32 8 packs a thread, fp16/bf16 4).
#   128: fp32 1 pack a thread (32 threads, all busy); fp16/bf16 1 pack, half the threads idle.
#   1000: 2 packs a thread, some threads' second pack past N. 4096, 8192: 2 packs a thread.
#   16384: fp32 4 packs a thread at 1024 threads; fp16/bf16 2.
# Causal (B, T, N), L = i + N - T + 1: T < N, T == N and T > N, with L inside a pack on most
# rows (N = 12 and 4 are whole packs for fp32 only), whole packs past L at several packs a
# thread (256 x 256), and rows with L <= 0 (all zeros).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,causal", [
    ((1, 1), False), ((3, 7), False), ((2, 128), False), ((2, 1000), False), ((2, 1025), False),
    ((1, 4096), False), ((1, 4097), False), ((2, 8192), False), ((2, 16384), False),
    ((1, 16392), False),
    ((2, 5, 5), True), ((1, 7, 12), True), ((2, 9, 4), True), ((1, 3, 1025), True),
    ((2, 5, 40), True), ((1, 8, 1000), True), ((1, 16, 16), True), ((1, 256, 256), True),
    ((2, 20, 8), True), ((1, 40, 24), True)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else ("causal" if v else "full"))
def test_softmax_cuda_emulated(cuda_emu, dtype, shape, causal):
    _check_softmax(cuda_emu, dtype, (torch.randn(shape) * 3).to(dtype), causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["x", "y", "dy"])
@pytest.mark.parametrize("shape,causal", [((3, 1000), False), ((2, 6, 1000), True)],
                         ids=["full", "causal"])
def test_softmax_cuda_emulated_misaligned(cuda_emu, dtype, which, shape, causal):
    # One element off a 16-byte boundary: that direction falls back to its generic kernel.
    _check_softmax(cuda_emu, dtype, (torch.randn(shape) * 3).to(dtype), causal,
                   misaligned=which)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,causal", [(40, False), (40, True), (4096, False), (41, False)],
                         ids=["40", "40-causal", "4096", "41-generic"])
def test_softmax_cuda_emulated_neg_inf_rows(cuda_emu, dtype, N, causal):
    # -inf entries (masked by the caller), a row that is -inf everywhere (zeros, no NaN), and
    # one whose only finite entry sits inside a pack (exactly 1 there).
    x = (torch.randn(4, N) * 3).to(dtype)
    x[0, ::3] = float("-inf")
    x[1] = float("-inf")
    x[2] = float("-inf")
    x[2, 1] = 0.5
    y, dx = _check_softmax(cuda_emu, dtype, x, causal, scale=1.0)
    assert (y[1] == 0).all() and (dx[1] == 0).all()
    assert y[2, 1] == 1 and (y[2, :1] == 0).all() and (y[2, 2:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [40, 41], ids=["vec", "generic"])
def test_softmax_cuda_emulated_nan_and_inf_rows(cuda_emu, dtype, N):
    # A NaN or +inf input makes its whole row NaN, as in torch (the kernels zeroed the rest).
    x = (torch.randn(3, N) * 3).to(dtype)
    x[0, 5] = float("nan")
    x[1, N - 1] = float("inf")
    y = sm_fwd(cuda_emu, x, 1.0, False, 1)
    assert torch.isnan(y[:2]).all()
    torch.testing.assert_close(y[2].float(), torch.softmax(x[2].double(), -1).float(),
                               rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-6)
