"""rope: every backend x dtype x (head_dim, seq, GQA, table layout) against the reference,
forward and backward; strided q/k; gradcheck in float64; torch.compile; bad input."""
import pytest
import torch

from minigpt import ops, reference
from minigpt._backend import BackendUnavailableError
from tests._tol import assert_close, f64
from tests.conftest import backend_device_pairs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tables(L, D, base=10000.0, device="cpu"):
    """Real RoPE tables (L, D), halves repeated, as Hugging Face Llama builds them."""
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64, device=device) / D)
    f = torch.outer(torch.arange(L, dtype=torch.float64, device=device), inv)
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().float(), emb.sin().float()


# (B, Hq, Hk, T, D, layout): head dims 8, 48, 64; T 1, 7, 33; GQA (Hq != Hk) and MQA.
# layout: "t" cos (T, D); "bt" cos (B, T, D); "bt1" cos (1, T, D) (Hugging Face's shape);
# "pos_t" tables + position_ids (T,) from an offset (decoding after a cache);
# "pos_bt" tables + position_ids (B, T), a different offset per sequence; "pos_1t" (1, T).
CASES = [
    (2, 4, 2, 7, 8, "t"),
    (1, 3, 3, 1, 48, "pos_t"),
    (2, 4, 1, 33, 64, "bt"),
    (2, 2, 2, 7, 48, "pos_bt"),
    (1, 4, 2, 33, 8, "pos_t"),
    (3, 6, 2, 1, 64, "pos_bt"),
    (1, 2, 1, 7, 64, "bt1"),
    (2, 1, 1, 7, 8, "pos_1t"),
]


def _inputs(B, T, D, layout, device="cpu", dtype=torch.float32):
    L = 50
    cos, sin = tables(L, D, device=device)
    if layout == "t":
        return cos[:T].to(dtype), sin[:T].to(dtype), None
    if layout in ("bt", "bt1"):
        nb = 1 if layout == "bt1" else B
        pos = torch.randint(0, L, (nb, T), device=device)
        return cos[pos].to(dtype), sin[pos].to(dtype), None
    if layout == "pos_t":
        pos = torch.arange(T, device=device) + (L - T)  # the last T slots of the table
    elif layout == "pos_1t":
        pos = (torch.arange(T, device=device) + 3)[None]
    else:
        offs = torch.randint(0, L - T + 1, (B, 1), device=device)
        pos = torch.arange(T, device=device)[None] + offs
    return cos.to(dtype), sin.to(dtype), pos.to(torch.int32 if layout == "pos_bt" else torch.int64)


def _qk(B, Hq, Hk, T, D, dtype, dev, strided):
    if strided:
        # The layout a (B, T, H, D) projection gives before transposing: no copy expected.
        q = torch.randn(B, T, Hq, D, device=dev).to(dtype).requires_grad_()
        k = torch.randn(B, T, Hk, D, device=dev).to(dtype).requires_grad_()
        return q, k, q.transpose(1, 2), k.transpose(1, 2)
    q = torch.randn(B, Hq, T, D, device=dev).to(dtype).requires_grad_()
    k = torch.randn(B, Hk, T, D, device=dev).to(dtype).requires_grad_()
    return q, k, q, k


def _check(be, dev, dtype, case, strided, table_dtype=torch.float32):
    B, Hq, Hk, T, D, layout = case
    cos, sin, pos = _inputs(B, T, D, layout, dev, table_dtype)
    q0, k0, q, k = _qk(B, Hq, Hk, T, D, dtype, dev, strided)
    qo, ko = ops.rope(q, k, cos, sin, position_ids=pos, backend=be)
    qo_lp, ko_lp = reference.rope(q, k, cos, sin, pos)
    q64, k64 = f64(q0), f64(k0)
    qq64, kk64 = (q64.transpose(1, 2), k64.transpose(1, 2)) if strided else (q64, k64)
    qo64, ko64 = reference.rope(qq64, kk64, cos.double(), sin.double(), pos)
    assert qo.dtype == dtype and ko.dtype == dtype
    assert_close(qo, qo64, qo_lp, dtype, "q_rot")
    assert_close(ko, ko64, ko_lp, dtype, "k_rot")

    gq, gk = torch.randn_like(qo64), torch.randn_like(ko64)
    grads = torch.autograd.grad([qo, ko], [q0, k0], [gq.to(dtype), gk.to(dtype)])
    grads_lp = torch.autograd.grad([qo_lp, ko_lp], [q0, k0], [gq.to(dtype), gk.to(dtype)])
    grads64 = torch.autograd.grad([qo64, ko64], [q64, k64], [gq, gk])
    for n, g, g_lp, g_64 in zip(("dq", "dk"), grads, grads_lp, grads64):
        assert g.dtype == dtype and g.shape == g_64.shape, n
        assert_close(g, g_64, g_lp, dtype, n)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Hq{}_Hk{}_T{}_D{}_{}".format(*c))
def test_rope_matches_reference(be, dev, dtype, case):
    _check(be, dev, dtype, case, strided=False)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_strided_qk(be, dev, dtype):
    _check(be, dev, dtype, (2, 4, 2, 7, 48, "pos_bt"), strided=True)
    _check(be, dev, dtype, (2, 4, 2, 7, 8, "t"), strided=True)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
def test_rope_low_precision_tables(be, dev):
    # Hugging Face hands cos/sin over in the activations' dtype.
    _check(be, dev, torch.bfloat16, (2, 4, 2, 7, 64, "bt1"), strided=False,
           table_dtype=torch.bfloat16)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
def test_rope_decode_matches_prefill(be, dev):
    # Rotating position t alone via position_ids must equal row t of the full prefill.
    B, H, T, D = 2, 3, 9, 16
    cos, sin = tables(32, D, device=dev)
    q, k = torch.randn(B, H, T, D, device=dev), torch.randn(B, 1, T, D, device=dev)
    qf, kf = ops.rope(q, k, cos[:T], sin[:T], backend=be)
    for t in (0, 5, T - 1):
        qs, ks = ops.rope(q[:, :, t:t + 1], k[:, :, t:t + 1], cos, sin,
                          position_ids=torch.tensor([t], device=dev), backend=be)
        torch.testing.assert_close(qs, qf[:, :, t:t + 1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ks, kf[:, :, t:t + 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("pdtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=str)
def test_rope_position_ids_of_any_integer_dtype(be, dev, pdtype):
    # Each backend reads them as int64 positions. To torch's indexing a uint8 tensor is a
    # boolean mask (here T == L: it picked rows 1..3 for positions [3, 1, 1, 2] and rotated
    # by the wrong angles) and int8/int16 are refused.
    D = 8
    cos, sin = tables(4, D, device=dev)
    q, k = torch.randn(2, 2, 4, D, device=dev), torch.randn(2, 1, 4, D, device=dev)
    pos = torch.tensor([3, 1, 1, 2], device=dev)
    want = reference.rope(q, k, cos, sin, pos)
    got = ops.rope(q, k, cos, sin, position_ids=pos.to(pdtype), backend=be)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("be", ["torch", "cpu"])
@pytest.mark.parametrize("with_pos", [False, True])
def test_rope_gradcheck_float64(be, with_pos):
    # Random (non-rotation) tables: the backward must be the exact transpose for any table.
    B, Hq, Hk, T, D = 2, 3, 1, 4, 6
    q = torch.randn(B, Hq, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hk, T, D, dtype=torch.float64, requires_grad=True)
    L = 9 if with_pos else T
    cos, sin = torch.randn(L, D, dtype=torch.float64), torch.randn(L, D, dtype=torch.float64)
    pos = torch.tensor([[1, 4, 0, 8], [2, 2, 7, 3]]) if with_pos else None
    f = lambda q_, k_: ops.rope(q_, k_, cos, sin, position_ids=pos, backend=be)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(f, (q, k), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
def test_rope_no_grad_to_tables(be, dev):
    cos, sin = tables(7, 8, device=dev)
    cos.requires_grad_()
    q = torch.randn(1, 2, 7, 8, device=dev, requires_grad=True)
    qo, ko = ops.rope(q, q, cos, sin, backend=be)
    (qo.sum() + ko.sum()).backward()
    assert cos.grad is None and q.grad is not None


@pytest.mark.parametrize("be,dev", backend_device_pairs())
def test_rope_compiles_fullgraph(be, dev):
    # Every backend: a compiled graph calls the registered custom ops and their fakes, which
    # eager mode skips (ops/_eager.py), and torch refuses a custom op whose output aliases an
    # input or another output (see test_layer_norm_compiles_fullgraph).
    cos, sin = tables(16, 8, device=dev)

    def f(q, k, pos):
        qo, ko = ops.rope(q, k, cos, sin, position_ids=pos, backend=be)
        return (qo * ko).sum()

    q = torch.randn(2, 2, 5, 8, device=dev, requires_grad=True)
    k = torch.randn(2, 2, 5, 8, device=dev, requires_grad=True)
    pos = torch.arange(5, device=dev) + 3
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, pos)
    g = torch.autograd.grad(out, [q, k])
    qr, kr = reference.rope(q, k, cos, sin, pos)
    ref = (qr * kr).sum()
    rg = torch.autograd.grad(ref, [q, k])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for a, c in zip(g, rg):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_rope_compiles_inductor():
    cos, sin = tables(5, 8)
    f = torch.compile(lambda q, k: ops.rope(q, k, cos, sin, backend="cpu")[0] * 2, fullgraph=True)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    torch.testing.assert_close(f(q, k), 2 * reference.rope(q, k, cos, sin)[0], rtol=1e-5, atol=1e-5)


def test_rope_default_backend_and_empty():
    cos, sin = tables(5, 8)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    for a, b in zip(ops.rope(q, k, cos, sin), reference.rope(q, k, cos, sin)):
        torch.testing.assert_close(a, b)
    qo, ko = ops.rope(q[:0], k[:0], cos, sin, backend="cpu")
    assert qo.shape == (0, 2, 5, 8) and ko.shape == (0, 1, 5, 8)


_q, _k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
_c, _s = tables(16, 8)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: ops.rope(_q.long(), _k, _c[:5], _s[:5]), TypeError, "floating"),
    (lambda: ops.rope(_q, _k, _c[:5].long(), _s[:5]), TypeError, "cos"),
    (lambda: ops.rope(_q[0], _k[0], _c[:5], _s[:5]), ValueError, "4-D"),
    (lambda: ops.rope(_q, torch.randn(1, 1, 4, 8), _c[:5], _s[:5]), ValueError, "k"),
    (lambda: ops.rope(_q, _k, _c[:5], _s[:5], backend="fast"), ValueError, "unknown backend"),
    (lambda: ops.rope(_q, _k, _c[:5], _s[:5], backend="cuda"), BackendUnavailableError, "cuda"),
    (lambda: ops.rope(_q[..., :7], _k[..., :7], _c[:5, :7], _s[:5, :7]), ValueError, "even"),
    (lambda: ops.rope(_q[..., :0], _k[..., :0], _c[:5, :0], _s[:5, :0]), ValueError, "empty"),
    (lambda: ops.rope(_q, _k.double(), _c[:5], _s[:5]), TypeError, "dtype"),
    (lambda: ops.rope(_q, _k, _c[:5], _s[:4]), ValueError, "same shape"),
    (lambda: ops.rope(_q, _k, _c[:6], _s[:6]), ValueError, "cos/sin"),
    (lambda: ops.rope(_q, _k, _c[:5, :4], _s[:5, :4]), ValueError, "cos/sin"),
    (lambda: ops.rope(_q, _k, _c[None, :5].expand(3, 5, 8), _s[None, :5].expand(3, 5, 8)),
     ValueError, "cos/sin"),
    (lambda: ops.rope(_q, _k, _c, _s, position_ids=torch.arange(5.0)), TypeError, "integer"),
    (lambda: ops.rope(_q, _k, _c, _s, position_ids=torch.arange(4)), ValueError, "position_ids"),
    (lambda: ops.rope(_q, _k, _c, _s, position_ids=torch.arange(5) + 12), ValueError, r"\[0, 16\)"),
    (lambda: ops.rope(_q, _k, _c, _s, position_ids=torch.arange(5) - 1), ValueError, r"\[0, 16\)"),
    (lambda: ops.rope(_q, _k, _c[None], _s[None], position_ids=torch.arange(5)), ValueError, "tables"),
    (lambda: ops.rope(_q, _k, _c[:5], _s[:5].to("meta")), ValueError, "device"),
    (lambda: ops.rope(_q, _k.to("meta"), _c[:5], _s[:5]), ValueError, "device"),
    (lambda: ops.rope(_q, _k, _c, _s, position_ids=torch.arange(5, device="meta")), ValueError,
     "device"),
])
def test_rope_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


def test_rope_extension_guards():
    """The raw entry point checks what its pointer code assumes (no crash if misused)."""
    from minigpt import _backend

    C = _backend.extension()
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    c, s = tables(16, 8)
    with pytest.raises(RuntimeError, match="unit last stride"):
        sq = torch.randn(1, 2, 8, 8).transpose(2, 3)
        C.rope(sq, sq, c[:8], s[:8], None, False)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        C.rope(q, k, c[:5].double(), s[:5].double(), None, False)
    with pytest.raises(RuntimeError, match=r"\(T, D\)"):
        C.rope(q, k, c, s, None, False)
    with pytest.raises(RuntimeError, match="outside the table"):
        C.rope(q, k, c, s, torch.arange(5) + 20, False)
    with pytest.raises(RuntimeError, match="int64"):
        C.rope(q, k, c, s, torch.arange(5, dtype=torch.int32), False)
