"""swiglu: every backend x dtype x awkward shape against the reference, forward and backward;
gradcheck in float64; torch.compile; bad input."""
import pytest
import torch

from minigpt import ops, reference
from minigpt._backend import BackendUnavailableError
from tests._tol import assert_close, f64, make
from tests.conftest import backend_device_pairs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Last dims 1, 7, 1000, 1025; a 1-D tensor; 3-D; one block plus one element (Triton's mask).
SHAPES = [(5, 1), (4, 7), (1, 1000), (2, 1025), (1025,), (2, 3, 7)]


def _check(be, dev, dtype, shape, noncontig):
    # scale 3: reach the tails of silu, where sigmoid saturates.
    gate = make(shape, dtype, dev, noncontig=noncontig, requires_grad=True, scale=3.0)
    up = make(shape, dtype, dev, noncontig=noncontig, requires_grad=True)
    y = ops.swiglu(gate, up, backend=be)
    y_lp = reference.swiglu(gate, up)
    g64, u64 = f64(gate), f64(up)
    y64 = reference.swiglu(g64, u64)
    assert y.shape == gate.shape and y.dtype == dtype
    assert_close(y, y64, y_lp, dtype, "y")

    dy = torch.randn_like(y64)
    grads = torch.autograd.grad(y, [gate, up], dy.to(dtype))
    grads_lp = torch.autograd.grad(y_lp, [gate, up], dy.to(dtype))
    grads64 = torch.autograd.grad(y64, [g64, u64], dy)
    for n, g, g_lp, g_64 in zip(("dgate", "dup"), grads, grads_lp, grads64):
        assert g.dtype == dtype, n
        assert_close(g, g_64, g_lp, dtype, n)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_matches_reference(be, dev, dtype, shape):
    _check(be, dev, dtype, shape, noncontig=False)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_extreme_gates_match_silu(be, dev, dtype):
    """sigmoid(g) must reach 0 for g below exp's range: the C++ exp saturated at exp(88.4),
    so silu(-3e38) came out as -1.25, not -0; g = -inf is NaN as in F.silu."""
    g = torch.tensor([-float("inf"), -3e38, -1e30, -100.0, -88.0, 0.5, 100.0, 3e38], device=dev)
    u = torch.tensor([1.0, 1.0, 1e8, 2.0, 3.0, 4.0, 5.0, 0.5], device=dev)
    g, u = g.to(dtype).requires_grad_(), u.to(dtype).requires_grad_()
    y = ops.swiglu(g, u, backend=be)
    want = torch.nn.functional.silu(g.float()) * u.float()
    torch.testing.assert_close(y.float(), want, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=0, equal_nan=True)
    dy = torch.ones_like(y)
    dg, du = torch.autograd.grad(y, [g, u], dy)
    g32, u32 = g.detach().float().requires_grad_(), u.detach().float().requires_grad_()
    wg, wu = torch.autograd.grad(torch.nn.functional.silu(g32) * u32, [g32, u32], dy.float())
    for got, ref in ((dg, wg), (du, wu)):
        torch.testing.assert_close(got.float(), ref, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_noncontiguous(be, dev, dtype):
    _check(be, dev, dtype, (3, 130), noncontig=True)


def test_swiglu_chunked_mlp_views():
    # The usual call: gate and up are the two halves of one projection, strided views.
    gu = torch.randn(4, 6, 2 * 40, requires_grad=True)
    gate, up = gu.chunk(2, dim=-1)
    y = ops.swiglu(gate, up, backend="cpu")
    (g,) = torch.autograd.grad((y * y).sum(), [gu])
    y_ref = reference.swiglu(gate, up)
    (g_ref,) = torch.autograd.grad((y_ref * y_ref).sum(), [gu])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("be", ["torch", "cpu"])
def test_swiglu_gradcheck_float64(be):
    gate = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: ops.swiglu(g, u, backend=be), (gate, up),
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
def test_swiglu_compiles_fullgraph(be, dev):
    # Every backend: a compiled graph calls the registered custom ops and their fakes, which
    # eager mode skips (ops/_eager.py), and torch refuses a custom op whose output aliases an
    # input or another output (see test_layer_norm_compiles_fullgraph).
    def mlp(x, w1, w3):
        return ops.swiglu(x @ w1, x @ w3, backend=be).sum()

    def leaf(*shape):
        return torch.randn(*shape, device=dev, requires_grad=True)

    x, w1, w3 = leaf(4, 16), leaf(16, 24), leaf(16, 24)
    out = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x, w1, w3)
    g = torch.autograd.grad(out, [x, w1, w3])
    ref = reference.swiglu(x @ w1, x @ w3).sum()
    rg = torch.autograd.grad(ref, [x, w1, w3])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for a, c in zip(g, rg):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-4)


def test_swiglu_compiles_inductor():
    f = torch.compile(lambda g, u: ops.swiglu(g, u, backend="cpu") + 1, fullgraph=True)
    g, u = torch.randn(5, 33), torch.randn(5, 33)
    torch.testing.assert_close(f(g, u), reference.swiglu(g, u) + 1, rtol=1e-5, atol=1e-6)


def test_swiglu_default_backend_and_empty():
    g, u = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(ops.swiglu(g, u), reference.swiglu(g, u))
    assert ops.swiglu(torch.randn(0, 8), torch.randn(0, 8), backend="cpu").shape == (0, 8)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: ops.swiglu(torch.ones(2, 4, dtype=torch.int64), torch.ones(2, 4)), TypeError, "floating"),
    (lambda: ops.swiglu(torch.randn(2, 4), torch.ones(2, 4, dtype=torch.int32)), TypeError, "up"),
    (lambda: ops.swiglu(torch.randn(2, 4), torch.randn(2, 5)), ValueError, "same shape"),
    (lambda: ops.swiglu(torch.randn(2, 4), torch.randn(4)), ValueError, "same shape"),
    (lambda: ops.swiglu(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64)), TypeError, "dtype"),
    (lambda: ops.swiglu(torch.randn(2, 4), torch.randn(2, 4, device="meta")), ValueError, "device"),
    (lambda: ops.swiglu(torch.randn(2, 4), torch.randn(2, 4), backend="fast"), ValueError,
     "unknown backend"),
    (lambda: ops.swiglu(torch.randn(2, 4), torch.randn(2, 4), backend="cuda"),
     BackendUnavailableError, "cuda"),
    (lambda: ops.swiglu([1.0], torch.randn(1)), TypeError, "gate"),
])
def test_swiglu_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


def test_swiglu_extension_guards():
    """The raw entry points check what their pointer code assumes (no crash if misused)."""
    from minigpt import _backend

    C = _backend.extension()
    g = torch.randn(8)
    with pytest.raises(RuntimeError, match="shape"):
        C.swiglu_fwd(g, torch.randn(9))
    with pytest.raises(RuntimeError, match="dtype"):
        C.swiglu_fwd(g, g.double())
    with pytest.raises(RuntimeError, match="1-D"):
        C.swiglu_fwd(g.view(2, 4), g.view(2, 4))
    with pytest.raises(RuntimeError, match="grad_output"):
        C.swiglu_bwd(torch.randn(7), g, g)
