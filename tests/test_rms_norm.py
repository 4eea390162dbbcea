"""rms_norm: every backend x dtype x awkward shape against the reference, forward and backward,
with and without the fused residual; gradcheck in float64; torch.compile; bad input."""
import pytest
import torch

from minigpt import ops, reference
from minigpt._backend import BackendUnavailableError
from tests._norms import (check_cpp_refuses_16bit_weights, check_mixed_residual, check_only_h_used,
                          check_out_dtype)
from tests._tol import assert_close, f64, make
from tests.conftest import backend_device_pairs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, N): last dims 1, 7, 1000, 1025, a batch of one row, and one row wider than
# the Triton fused block (its streaming path).
SHAPES = [((3, 5), 1), ((4,), 7), ((1,), 1000), ((2, 3), 1025), ((1,), 9000)]


def _run(be, x, w, r):
    out = ops.rms_norm(x, w, eps=1e-6, residual=r, backend=be)
    return out if r is not None else (out, None)


def _check(be, dev, dtype, lead, N, residual, noncontig, wdtype=torch.float32):
    shape = (*lead, N)
    x = make(shape, dtype, dev, noncontig=noncontig, requires_grad=True)
    r = make(shape, dtype, dev, requires_grad=True) if residual else None
    w = (1 + 0.5 * torch.randn(N, device=dev)).to(wdtype).requires_grad_()
    leaves = [t for t in (x, w, r) if t is not None]

    y, h = _run(be, x, w, r)
    y_lp, h_lp = _run("torch", x, w, r)
    x64, w64 = f64(x), f64(w)
    r64 = f64(r) if r is not None else None
    y64, h64 = _run("torch", x64, w64, r64)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y64, y_lp, dtype, "y")
    if residual:
        # h is x + residual rounded to the input dtype; allow one ulp because the Triton
        # interpreter's float32 -> bfloat16 cast truncates instead of rounding to nearest.
        torch.testing.assert_close(h, h_lp, rtol=torch.finfo(dtype).eps, atol=0)

    gy = torch.randn_like(y64)
    gh = torch.randn_like(y64) if residual else None

    def loss(y_, h_, cast):
        s = (y_.to(cast) * gy.to(cast)).sum()
        if residual:
            s = s + (h_.to(cast) * gh.to(cast)).sum()
        return s

    grads = torch.autograd.grad(loss(y, h, torch.float32), leaves)
    grads_lp = torch.autograd.grad(loss(y_lp, h_lp, torch.float32), leaves)
    leaves64 = [t for t in (x64, w64, r64) if t is not None]
    grads64 = torch.autograd.grad(loss(y64, h64, torch.float64), leaves64)
    names = [n for n, t in zip(("dx", "dw", "dr"), (x, w, r)) if t is not None]
    for n, g, g_lp, g64 in zip(names, grads, grads_lp, grads64):
        assert g.dtype == {"dx": x, "dw": w, "dr": x}[n].dtype, n
        # dweight sums over all rows: scale the floor by the row count.
        rows = x.numel() // N if n == "dw" else 1
        assert_close(g, g64, g_lp, dtype if n != "dw" else w.dtype, n,
                     floor=None if n != "dw" else 1e-5 * rows ** 0.5 * (
                         1 if dtype == torch.float32 else 100))


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,N", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(be, dev, dtype, lead, N, residual):
    _check(be, dev, dtype, lead, N, residual, noncontig=False)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_noncontiguous(be, dev, dtype):
    _check(be, dev, dtype, (2, 3), 130, residual=True, noncontig=True)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead,N,residual", [((5,), 64, False), ((2, 3), 1025, True),
                                             ((3,), 4097, False)], ids=str)
def test_rms_norm_low_precision_weight(be, dev, wdtype, lead, N, residual):
    # A 16-bit model keeps a 16-bit weight: math in fp32 either way, the grad back in its own
    # dtype (Triton and CUDA read it as it is; the C++ ops cast).
    _check(be, dev, wdtype, lead, N, residual=residual, noncontig=False, wdtype=wdtype)


def test_cpp_kernels_take_16bit_weights_only_on_cuda():
    check_cpp_refuses_16bit_weights(lambda C, x, w: C.rms_norm_fwd(x, w, None, 1e-6),
                                    lambda C, x, w: C.rms_norm_bwd(x, None, x, w, torch.ones(3), False))


@pytest.mark.parametrize("be", ["torch", "cpu"])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_gradcheck_float64(be, residual):
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 9, dtype=torch.float64, requires_grad=True) if residual else None

    def f(*args):
        return ops.rms_norm(args[0], args[1], residual=args[2] if residual else None, backend=be)

    inputs = (x, w, r) if residual else (x, w)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
def test_rms_norm_compiles_fullgraph(be, dev):
    # Every backend: a compiled graph calls the registered custom ops and their fakes, which
    # eager mode skips (ops/_eager.py), and torch refuses a custom op whose output aliases an
    # input or another output (see test_layer_norm_compiles_fullgraph).
    def block(x, r, w):
        y, h = ops.rms_norm(x, w, residual=r, backend=be)
        return (y * 2 + h).sum()

    def leaf(*shape):
        return torch.randn(*shape, device=dev, requires_grad=True)

    x, r, w = leaf(4, 64), leaf(4, 64), leaf(64)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, r, w)
    g = torch.autograd.grad(out, [x, w, r])
    ref_y, ref_h = reference.rms_norm(x, w, residual=r)
    ref = (ref_y * 2 + ref_h).sum()
    rg = torch.autograd.grad(ref, [x, w, r])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for a, c in zip(g, rg):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-4)


def test_rms_norm_compiles_inductor():
    f = torch.compile(lambda x, w: ops.rms_norm(x, w, backend="cpu") * 2, fullgraph=True)
    x, w = torch.randn(5, 33), torch.randn(33)
    torch.testing.assert_close(f(x, w), 2 * reference.rms_norm(x, w), rtol=1e-5, atol=1e-5)


def test_rms_norm_default_backend_and_empty_rows():
    x, w = torch.randn(2, 8), torch.randn(8)
    torch.testing.assert_close(ops.rms_norm(x, w), reference.rms_norm(x, w))
    e = torch.randn(0, 8)
    assert ops.rms_norm(e, w, backend="cpu").shape == (0, 8)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: ops.rms_norm(torch.ones(2, 4, dtype=torch.int64), torch.ones(4)), TypeError, "floating"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.randn(5)), ValueError, "weight"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.randn(2, 4)), ValueError, "weight"),
    (lambda: ops.rms_norm(torch.randn(2, 0), torch.randn(0)), ValueError, "empty"),
    (lambda: ops.rms_norm(torch.randn(()), torch.randn(1)), ValueError, "scalar"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.randn(4), residual=torch.randn(2, 5)),
     ValueError, "residual"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.randn(4),
                          residual=torch.ones(2, 4, dtype=torch.int32)), TypeError, "residual"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.randn(4), eps=-1.0), ValueError, "eps"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.randn(4), eps=float("nan")), ValueError, "eps"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.randn(4), eps=float("inf")), ValueError, "eps"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.randn(4), eps=True), ValueError, "eps"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.randn(4), backend="fast"), ValueError,
     "unknown backend"),
    (lambda: ops.rms_norm(torch.randn(2, 4), torch.randn(4), backend="cuda"),
     BackendUnavailableError, "cuda"),
    (lambda: ops.rms_norm(torch.randn(2, 4), "w"), TypeError, "weight"),
])
def test_rms_norm_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


def test_rms_norm_mixed_devices():
    # The meta device stands in for a second device on a machine without a GPU.
    with pytest.raises(ValueError, match="device"):
        ops.rms_norm(torch.randn(2, 4), torch.randn(4, device="meta"))
    with pytest.raises(ValueError, match="device"):
        ops.rms_norm(torch.randn(2, 4), torch.randn(4), residual=torch.randn(2, 4, device="meta"))


def test_rms_norm_extension_guards():
    """The raw entry points check what their pointer code assumes (no crash if misused)."""
    from minigpt import _backend

    C = _backend.extension()
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="weight"):
        C.rms_norm_fwd(x, w.double(), None, 1e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.rms_norm_fwd(x.t(), w, None, 1e-6)
    with pytest.raises(RuntimeError, match="residual"):
        C.rms_norm_fwd(x, w, torch.randn(4, 9), 1e-6)
    y, h, rstd = C.rms_norm_fwd(x, w, None, 1e-6)
    with pytest.raises(RuntimeError, match="statistics"):
        C.rms_norm_bwd(torch.randn(4, 8), None, x, w, rstd[:3], False)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("xd,rd", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                   (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("N", [40, 1000, 9000])  # 9000: rows wider than one Triton block
def test_rms_norm_mixed_residual_dtype(be, dev, xd, rd, N):
    check_mixed_residual(_rms, _rms_ref, be, dev, xd, rd, N, bias=False)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_out_dtype(be, dev, residual):
    check_out_dtype(_rms, be, dev, residual, torch.float16, seed=8, bad_out_dtype="bf16")


@pytest.mark.parametrize("be,dev", backend_device_pairs())
def test_rms_norm_only_h_used(be, dev):
    check_only_h_used(_rms, be, dev, bias=False)


def _rms(x, w, b, **kw):  # the shared norm checks' signature (no bias)
    return ops.rms_norm(x, w, **kw)


def _rms_ref(x, w, b, **kw):
    return reference.rms_norm(x, w, **kw)
