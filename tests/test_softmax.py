"""softmax: every backend x dtype x awkward shape (plain and causal) against the reference,
forward and backward; gradcheck in float64; torch.compile; bad input."""
import pytest
import torch

from minigpt import ops, reference
from minigpt._backend import BackendUnavailableError
from minigpt.reference.softmax import causal_mask
from tests._tol import assert_close, f64, make
from tests.conftest import backend_device_pairs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape, scale): last dims 1, 7, 1000, 1025, 4097 (Triton: several warps' worth in one
# block), a batch of one row, and 9000 (wider than Triton's fused block: the online path).
SHAPES = [((3, 5, 1), 1.0), ((4, 7), 0.7), ((1, 1000), 1.0), ((2, 3, 1025), 0.125),
          ((3, 4097), 2.0), ((1, 9000), 1.0)]
# Causal (..., T, S): T == S, T < S (a KV cache: every row sees the older keys), T > S (the
# first T - S rows see nothing and must be zeros, not NaN). A negative scale checks the mask
# is applied after scaling.
CAUSAL = [((2, 6, 6), 1.0), ((3, 5, 11), 0.5), ((2, 9, 4), 1.0), ((1, 3, 9000), -1.5),
          ((4, 17, 17), -0.3)]


def _check(be, dev, dtype, shape, scale, causal, noncontig=False, x_scale=2.0):
    x = make(shape, dtype, dev, noncontig=noncontig, requires_grad=True, scale=x_scale)
    y = ops.softmax(x, scale=scale, causal=causal, backend=be)
    y_lp = ops.softmax(x, scale=scale, causal=causal, backend="torch")
    x64 = f64(x)
    y64 = reference.softmax(x64, scale, causal)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y64, y_lp, dtype, "y")
    if causal:
        T, S = shape[-2], shape[-1]
        masked = ~causal_mask(T, S, x.device)
        assert (y[..., masked] == 0).all(), "masked entries must be exactly zero"

    gy = torch.randn_like(y64)
    (gx,) = torch.autograd.grad((y.double() * gy).sum(), [x])
    (gx_lp,) = torch.autograd.grad((y_lp.double() * gy).sum(), [x])
    (gx64,) = torch.autograd.grad((y64 * gy).sum(), [x64])
    assert_close(gx, gx64, gx_lp, dtype, "dx")


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,scale", SHAPES, ids=lambda v: str(v))
def test_softmax_matches_reference(be, dev, dtype, shape, scale):
    _check(be, dev, dtype, shape, scale, causal=False)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,scale", CAUSAL, ids=lambda v: str(v))
def test_softmax_causal_matches_reference(be, dev, dtype, shape, scale):
    _check(be, dev, dtype, shape, scale, causal=True)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_softmax_wide_row(be, dev, causal):
    # One 65536-wide row (fp32 only: the interpreter is slow); causal with T=2 masks the
    # last column of the first row only.
    shape = (2, 65536) if causal else (1, 65536)
    _check(be, dev, torch.float32, shape, 1.0, causal=causal)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_softmax_noncontiguous(be, dev, dtype, causal):
    _check(be, dev, dtype, (2, 5, 130), 0.9, causal=causal, noncontig=True)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
def test_softmax_large_logits_and_inf(be, dev):
    # Logits far beyond exp's range must not overflow (the max is subtracted first), and -inf
    # inputs (an additive mask) give exact zeros.
    x = torch.randn(4, 300, device=dev) * 1000
    x[:, ::3] = float("-inf")
    y = ops.softmax(x, backend=be)
    ref = reference.softmax(x.double()).float()
    assert torch.isfinite(y).all()
    assert (y[:, ::3] == 0).all()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [3, 1000, 9000])
def test_softmax_huge_scale(be, dev, dtype, n):
    # scale * x ~ 1e10: a kernel that fuses `x * scale - max` into one FMA lands the row's max
    # up to half an ulp of 1e10 (~1e3) above 0, and an exp with no clamp above 0 overflowed
    # (the C++ kernel returned rows of zeros). One value stands 2 above the rest, so the
    # answer is one-hot in every dtype; 3 * 1e10 is not a float32, so the FMA's result differs
    # from the rounded product.
    x = torch.rand(2, n, device=dev)
    x[0, n // 3], x[1, -1] = 3.0, 3.0
    x = x.to(dtype)
    y = ops.softmax(x, scale=1e10, backend=be)
    ref = reference.softmax(x.double(), 1e10)
    assert torch.equal(y.double(), ref), (y.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("n", [7, 9000])
def test_softmax_zero_scale_is_uniform_over_kept_columns(be, dev, n):
    # softmax(0 * x): 1/L over the L columns a row keeps and exact zeros past them (causal).
    x = make((2, 3, n), torch.float32, dev)
    y = ops.softmax(x, scale=0.0, causal=True, backend=be)
    ref = reference.softmax(x.double(), 0.0, True)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("n", [17, 9000])
def test_softmax_all_masked_row_is_zero_and_nan_propagates(be, dev, n):
    # Every backend agrees with torch on the edge cases: a row that is all -inf (an additive
    # mask that hides everything) is zeros, not 0/0; a NaN or +inf input makes its whole row
    # NaN. The kernels once zeroed the rest of such a row (a `sum > 0` test on the NaN sum):
    # a row of zeros and one NaN, which no longer sums to 1.
    x = torch.randn(4, n, device=dev)
    x[0] = float("-inf")
    x[2, 5] = float("nan")
    x[3, n - 2] = float("inf")
    y = ops.softmax(x, backend=be)
    assert (y[0] == 0).all()
    torch.testing.assert_close(y[1], reference.softmax(x[1:2])[0], rtol=1e-5, atol=1e-6)
    assert torch.isnan(y[2:]).all() and torch.isnan(reference.softmax(x[2:])).all()


@pytest.mark.parametrize("be", ["torch", "cpu"])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_softmax_gradcheck_float64(be, causal):
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: ops.softmax(t, scale=0.7, causal=causal, backend=be), (x,), eps=1e-6, atol=1e-6)


def test_softmax_double_backward_is_not_silently_wrong():
    # The kernels' backward records no graph: asking for a second derivative must raise, not
    # return zeros (the create_graph=True backward itself refuses, test_backend.py has all ops).
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    y = ops.softmax(x, backend="cpu")
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(y[:, 0].sum(), [x], create_graph=True)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
def test_softmax_compiles_fullgraph(be, dev):
    # Every backend: a compiled graph calls the registered custom ops and their fakes, which
    # eager mode skips (ops/_eager.py), and torch refuses a custom op whose output aliases an
    # input or another output (see test_layer_norm_compiles_fullgraph).
    def block(x):
        p = ops.softmax(x, scale=0.5, causal=True, backend=be)
        return (p * p).sum()

    x = torch.randn(2, 8, 8, device=dev, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (gx,) = torch.autograd.grad(out, [x])
    p = reference.softmax(x, 0.5, True)
    ref = (p * p).sum()
    (rgx,) = torch.autograd.grad(ref, [x])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)


def test_softmax_compiles_inductor():
    f = torch.compile(lambda x: ops.softmax(x, scale=2.0, backend="cpu") + 1, fullgraph=True)
    x = torch.randn(5, 33)
    torch.testing.assert_close(f(x), reference.softmax(x, 2.0) + 1, rtol=1e-5, atol=1e-6)


def test_softmax_default_backend_and_env(monkeypatch):
    x = torch.randn(3, 10)
    ref = reference.softmax(x)
    torch.testing.assert_close(ops.softmax(x), ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("MINIGPT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="MINIGPT_BACKEND"):
        ops.softmax(x)
    monkeypatch.setenv("MINIGPT_BACKEND", "torch")
    torch.testing.assert_close(ops.softmax(x), ref)


def test_softmax_numpy_scale():
    import numpy as np

    x = torch.randn(3, 9)
    torch.testing.assert_close(ops.softmax(x, scale=np.float32(0.5), backend="cpu"),
                               reference.softmax(x, 0.5), rtol=1e-5, atol=1e-6)


def test_softmax_empty_batch():
    x = torch.randn(0, 3, 5)
    for be in ("cpu", "torch"):
        assert ops.softmax(x, causal=True, backend=be).shape == (0, 3, 5)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: ops.softmax(torch.ones(2, 4, dtype=torch.int64)), TypeError, "floating"),
    (lambda: ops.softmax([1.0, 2.0]), TypeError, "Tensor"),
    (lambda: ops.softmax(torch.randn(2, 0)), ValueError, "empty"),
    (lambda: ops.softmax(torch.tensor(1.0)), ValueError, "scalar"),
    (lambda: ops.softmax(torch.randn(5), causal=True), ValueError, "causal"),
    (lambda: ops.softmax(torch.randn(2, 4), scale=float("nan")), ValueError, "finite"),
    (lambda: ops.softmax(torch.randn(2, 4), scale=float("inf")), ValueError, "finite"),
    (lambda: ops.softmax(torch.randn(2, 4), scale="2"), TypeError, "scale"),
    (lambda: ops.softmax(torch.randn(2, 4), scale=torch.tensor(2.0)), TypeError, "scale"),
    (lambda: ops.softmax(torch.randn(2, 4), causal="yes"), TypeError, "causal"),
    (lambda: ops.softmax(torch.randn(2, 4), backend="fast"), ValueError, "unknown backend"),
    (lambda: ops.softmax(torch.randn(2, 4), backend="cuda"), BackendUnavailableError, "cuda"),
    (lambda: ops.softmax(torch.randn(2, 4, device="meta"), backend="cpu"),
     BackendUnavailableError, "cpu"),
])
def test_softmax_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1e39, -3.5e38, 1e300])
def test_softmax_scale_beyond_float32_is_refused(be, dev, dtype, scale):
    # Finite as a Python float, inf as the float32 every backend computes in for these dtypes:
    # the reference and the C++ kernel gave NaN rows, Triton one-hot rows.
    x = torch.randn(2, 5, device=dev).to(dtype)
    for causal in (False, True):
        with pytest.raises(ValueError, match="float32's largest"):
            ops.softmax(x, scale=scale, causal=causal, backend=be)
    # A large scale that float32 holds is taken: one-hot on the row's max.
    y = ops.softmax(x, scale=1e30, backend=be)
    want = torch.nn.functional.one_hot(x.argmax(-1), 5).to(dtype)
    assert torch.equal(y, want), y


@pytest.mark.parametrize("be", ["torch", "cpu"])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_float64_takes_a_scale_beyond_float32(be, causal):
    # float64 runs in float64 with the scale as given on both backends that take it.
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    for scale in (1e39, -1e300):
        z = x * scale
        if causal:
            z = z.masked_fill(~causal_mask(4, 6, x.device), float("-inf"))
        torch.testing.assert_close(ops.softmax(x, scale=scale, causal=causal, backend=be),
                                   torch.softmax(z, -1), rtol=0, atol=1e-12)
