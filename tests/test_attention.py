"""attention / decode_attention: every backend against the reference, forward and backward, in
fp32/bf16/fp16, MHA and GQA (ratios 1, 3, 4), awkward head dims (48, 80, 96) and lengths (1, 7,
33, 100, 130, 1025), T != S and T > S (queries that see no key), non-contiguous q/k/v; float64
gradcheck; torch.compile; ragged KV-cache decode; bad input.

Tolerance is FlashAttention's rule (tests/_tol.py): a kernel's error against the float64 truth may
be at most twice the error of eager PyTorch attention computed in the same low-precision dtype,
plus an absolute floor. In the Triton interpreter the bf16/fp16 kernels take their fp32-dot path
(the interpreter's bf16 tl.dot is wrong), but P is still rounded to the input dtype before P V,
as on the GPU.
"""
import math

import pytest
import torch

from minigpt import _backend, ops, reference
from minigpt._backend import BackendUnavailableError
from tests._tol import assert_close, f64
from tests.conftest import backend_device_pairs, skip_if_triton_refused

PAIRS = backend_device_pairs()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (B, Hq, Hkv, T, S, D, causal). Interpreter-friendly: B * Hq small, T, S <= 130.
CASES = {
    "mha-7-d16": (1, 2, 2, 7, 7, 16, True),
    "gqa3-33x70-d48": (2, 3, 1, 33, 70, 48, True),
    "mqa4-100-d80": (1, 4, 1, 100, 100, 80, True),
    "gqa2-T>S-70x33-d64": (1, 4, 2, 70, 33, 64, True),
    "T1-S130-d96": (1, 2, 1, 1, 130, 96, True),
    "full-65-d128": (2, 2, 2, 65, 65, 128, False),
    "full-gqa4-7x100-d32": (1, 4, 1, 7, 100, 32, False),
}
LOWP_CASES = ["gqa3-33x70-d48", "mqa4-100-d80", "gqa2-T>S-70x33-d64"]


def _eager(q, k, v, causal, scale):
    """Attention the way eager PyTorch does it in q's own dtype (matmuls and softmax in that
    dtype): the yardstick of FlashAttention's tolerance rule."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, 1)
    v = v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        T, S = q.shape[2], k.shape[2]
        keep = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
        s = s.masked_fill(~keep.to(q.device), float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return p @ v


def _inputs(shape_q, shape_kv, dtype, dev, transposed=False):
    """q, k, v with gradients; ``transposed`` builds them as (B, T, H, D) tensors viewed as
    (B, H, T, D), the layout a model gets from splitting a linear layer's output."""
    def one(shape):
        if transposed:
            B, H, T, D = shape
            base = torch.randn(B, T, H, D, device=dev).to(dtype).requires_grad_()
            return base, base.transpose(1, 2)
        t = torch.randn(*shape, device=dev).to(dtype).requires_grad_()
        return t, t
    return [one(shape_q), one(shape_kv), one(shape_kv)]


def _check(be, dev, dtype, case, transposed=False, scale=None):
    B, Hq, Hkv, T, S, D, causal = case
    (ql, q), (kl, k), (vl, v) = _inputs((B, Hq, T, D), (B, Hkv, S, D), dtype, dev, transposed)
    if transposed:
        assert not q.is_contiguous()
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    out = ops.attention(q, k, v, causal=causal, scale=scale, backend=be)
    q64, k64, v64 = f64(q), f64(k), f64(v)
    out64 = reference.attention(q64, k64, v64, causal, sc)
    out_lp = _eager(q, k, v, causal, sc)
    assert out.shape == (B, Hq, T, D) and out.dtype == dtype
    assert_close(out, out64, out_lp, dtype, "out")

    g = torch.randn(B, Hq, T, D, device=dev, dtype=torch.float64)
    grads = torch.autograd.grad(out, (ql, kl, vl), g.to(dtype))
    grads_lp = torch.autograd.grad(out_lp, (ql, kl, vl), g.to(dtype))
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), g)
    if transposed:
        grads64 = [t.transpose(1, 2) for t in grads64]
    for name, a, a_lp, a64 in zip(("dq", "dk", "dv"), grads, grads_lp, grads64):
        assert_close(a, a64, a_lp, dtype, name)


@pytest.mark.parametrize("be,dev", PAIRS)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_attention_fp32(be, dev, case):
    _check(be, dev, torch.float32, CASES[case])


@pytest.mark.parametrize("be,dev", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LOWP_CASES, ids=str)
def test_attention_low_precision(be, dev, dtype, case):
    _check(be, dev, dtype, CASES[case])


@pytest.mark.parametrize("be,dev", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_noncontiguous(be, dev, dtype):
    # q, k, v as transposes of (B, T, H, D): strided, no copy on the kernel paths.
    _check(be, dev, dtype, (2, 4, 2, 37, 45, 48, True), transposed=True)


@pytest.mark.parametrize("be,dev", PAIRS)
def test_attention_explicit_scale(be, dev):
    _check(be, dev, torch.float32, (1, 3, 3, 20, 20, 24, True), scale=0.37)


@pytest.mark.parametrize("be,dev", [p for p in PAIRS if p.values[0] in ("cpu", "cuda")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(1, 2, 1, 1025, 1025, 64, True), (1, 3, 1, 200, 1025, 40, True),
                                  (1, 1, 1, 300, 130, 64, False)], ids=str)
def test_attention_long(be, dev, dtype, case):
    # Many query and key tiles, ragged last tiles, T > S and T < S (C++/CUDA only: too slow for
    # the interpreter). bf16: the CUDA backend's tensor-core kernels over many tiles.
    _check(be, dev, dtype, case)


@pytest.mark.parametrize("threads", [1, 64])
def test_attention_cpu_backward_schedules(threads):
    # The C++ backward runs one task per (batch, kv head) when there are at least as many pairs
    # as threads, else two passes with finer tasks: cover both.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check("cpu", "cpu", torch.float32, (2, 6, 2, 90, 130, 40, True))
    finally:
        torch.set_num_threads(old)


def test_attention_rows_without_keys_are_zero():
    # T > S, causal: the first T - S queries see nothing; their output and gradient are 0.
    q = torch.randn(1, 2, 9, 16, requires_grad=True)
    k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    for be in [b for b in ("cpu", "triton", "torch") if _backend.is_available(b, "cpu")]:
        out = ops.attention(q, k, v, backend=be)
        assert torch.all(out[:, :, :5] == 0), be
        assert out[:, :, 5:].abs().sum() > 0, be
        (dq,) = torch.autograd.grad(out.sum(), q)
        assert torch.all(dq[:, :, :5] == 0) and torch.isfinite(dq).all(), be


@pytest.mark.parametrize("be", ["torch", "cpu"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_gradcheck_float64(be, causal):
    # GQA (2 query heads per kv head), T != S, a head dim that is not a multiple of 16.
    q = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.attention(a, b, c, causal=causal, backend=be), (q, k, v),
        eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("be,dev", PAIRS)
def test_attention_compiles_fullgraph(be, dev):
    # Every backend: a compiled graph calls the registered custom ops and their fakes, which
    # eager mode skips (ops/_eager.py), and torch refuses a custom op whose output aliases an
    # input or another output (see test_layer_norm_compiles_fullgraph).
    def block(q, k, v):
        return (ops.attention(q, k, v, backend=be) * 2).sum()

    q = torch.randn(1, 4, 10, 16, device=dev, requires_grad=True)
    k = torch.randn(1, 2, 12, 16, device=dev, requires_grad=True)
    v = torch.randn(1, 2, 12, 16, device=dev, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v))
    ref = (reference.attention(q, k, v) * 2).sum()
    rgrads = torch.autograd.grad(ref, (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("be,dev", PAIRS)
def test_decode_compiles_fullgraph(be, dev):
    # Every backend, forward only: decoding has no backward (see
    # test_attention_compiles_fullgraph for why each backend).
    f = torch.compile(lambda q, kc, vc, L: ops.decode_attention(q, kc, vc, L, backend=be),
                      fullgraph=True, backend="aot_eager")
    q, kc, vc = (torch.randn(2, 4, 1, 16, device=dev), torch.randn(2, 2, 9, 16, device=dev),
                 torch.randn(2, 2, 9, 16, device=dev))
    L = torch.tensor([3, 9], dtype=torch.int32, device=dev)
    torch.testing.assert_close(f(q, kc, vc, L), reference.decode_attention(q, kc, vc, L),
                               rtol=1e-5, atol=1e-5)


def _eager_decode(q, kc, vc, L, scale):
    rep = q.shape[1] // kc.shape[1]
    k = kc.repeat_interleave(rep, 1)
    v = vc.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    valid = torch.arange(kc.shape[2], device=q.device)[None, :] < L.to(q.device)[:, None]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("be,dev", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,S_max,D,lens", [
    (3, 4, 1, 100, 48, [1, 57, 100]),    # MQA-like ratio 4, ragged, one cache full
    (2, 6, 2, 130, 80, [129, 33]),       # ratio 3, several splits on the Triton path
    (1, 2, 2, 7, 64, [7]),               # MHA, tiny cache
    (1, 6, 2, 50, 64, [37]),             # ratio 3 split 2 + 1 across CPU tasks (2 threads)
], ids=str)
def test_decode_matches_reference(be, dev, dtype, B, Hq, Hkv, S_max, D, lens):
    q = torch.randn(B, Hq, 1, D, device=dev).to(dtype)
    kc = torch.randn(B, Hkv, S_max, D, device=dev).to(dtype)
    vc = torch.randn(B, Hkv, S_max, D, device=dev).to(dtype)
    # Huge garbage past each sequence's length: reading it would swamp the result.
    for b, n in enumerate(lens):
        kc[b, :, n:] = 1e3
        vc[b, :, n:] = 1e3
    L = torch.tensor(lens, device=dev)
    out = ops.decode_attention(q, kc, vc, L, backend=be)
    scale = 1.0 / math.sqrt(D)
    ref64 = reference.decode_attention(q.double(), kc.double(), vc.double(), L, scale)
    ref_lp = _eager_decode(q, kc, vc, L, scale)
    assert out.shape == (B, Hq, 1, D) and out.dtype == dtype
    assert_close(out, ref64, ref_lp, dtype, "decode")


@pytest.mark.parametrize("be,dev", PAIRS)
def test_decode_noncontiguous_cache_int32(be, dev):
    # A cache allocated (B, S_max, H, D) and viewed as (B, H, S_max, D); int32 lengths.
    B, Hq, Hkv, S, D = 2, 4, 2, 40, 32
    kc = torch.randn(B, S, Hkv, D, device=dev).transpose(1, 2)
    vc = torch.randn(B, S, Hkv, D, device=dev).transpose(1, 2)
    q = torch.randn(B, 1, Hq, D, device=dev).transpose(1, 2)
    L = torch.tensor([40, 17], dtype=torch.int32, device=dev)
    out = ops.decode_attention(q, kc, vc, L, scale=0.2, backend=be)
    ref = reference.decode_attention(q.double(), kc.double(), vc.double(), L, 0.2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_decode_equals_attention_on_the_prefix():
    # The last row of causal attention over a sequence = decode against its cache.
    q = torch.randn(1, 4, 23, 32)
    k, v = torch.randn(1, 2, 23, 32), torch.randn(1, 2, 23, 32)
    full = ops.attention(q, k, v, backend="cpu")[:, :, -1:]
    kc = torch.cat([k, torch.randn(1, 2, 9, 32)], 2)
    vc = torch.cat([v, torch.randn(1, 2, 9, 32)], 2)
    dec = ops.decode_attention(q[:, :, -1:], kc, vc, torch.tensor([23]), backend="cpu")
    torch.testing.assert_close(dec, full, rtol=1e-5, atol=1e-6)


def test_decode_with_grad_uses_the_differentiable_reference():
    q = torch.randn(1, 2, 1, 16, requires_grad=True)
    kc, vc = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    out = ops.decode_attention(q, kc, vc, torch.tensor([4]), backend="cpu")
    (g,) = torch.autograd.grad(out.sum(), q)
    (rg,) = torch.autograd.grad(reference.decode_attention(q, kc, vc, torch.tensor([4])).sum(), q)
    torch.testing.assert_close(g, rg)


def test_backends_present():
    assert _backend.is_available("cpu", "cpu")
    assert hasattr(_backend.extension(), "attention_fwd")


Q, K, V = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
# Where Triton runs: the GPU if there is one, else the interpreter on CPU tensors.
TDEV = "cuda" if torch.cuda.is_available() else "cpu"
QD = torch.randn(2, 4, 1, 16)
KC, VC = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
LENS = torch.tensor([3, 8])


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: ops.attention(Q, K[..., :8], V[..., :8]), ValueError, "head dim"),
    (lambda: ops.attention(Q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)), ValueError,
     "multiple"),
    (lambda: ops.attention(Q, torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)), ValueError,
     "batch"),
    (lambda: ops.attention(Q, K, torch.randn(1, 2, 9, 16)), ValueError, "same shape"),
    (lambda: ops.attention(Q[0], K[0], V[0]), ValueError, "4-D"),
    (lambda: ops.attention(Q, K.double(), V.double()), TypeError, "dtype"),
    (lambda: ops.attention(Q.long(), K.long(), V.long()), TypeError, "floating"),
    (lambda: ops.attention(Q, K.to("meta"), V.to("meta")), ValueError, "device"),
    (lambda: ops.attention(Q, K, V, scale="x"), TypeError, "scale"),
    (lambda: ops.attention(Q, K, V, causal=1), TypeError, "causal"),
    (lambda: ops.attention(Q, K, V, backend="cuda"), BackendUnavailableError, "cuda"),
    (lambda: ops.attention(Q, K, V, backend="fast"), ValueError, "unknown backend"),
    pytest.param(lambda: ops.attention(*(t.double().to(TDEV) for t in (Q, K, V)),
                                       backend="triton"), TypeError, "float64",
                 marks=skip_if_triton_refused),
    pytest.param(lambda: ops.attention(*(torch.randn(1, 1, 2, 300, device=TDEV) for _ in range(3)),
                                       backend="triton"), ValueError, "head_dim",
                 marks=skip_if_triton_refused),
    (lambda: ops.decode_attention(QD, KC, VC, torch.tensor([0, 8])), ValueError, "cache_seqlens"),
    (lambda: ops.decode_attention(QD, KC, VC, torch.tensor([3, 9])), ValueError, "cache_seqlens"),
    (lambda: ops.decode_attention(QD, KC, VC, torch.tensor([3.0, 8.0])), TypeError, "int32"),
    (lambda: ops.decode_attention(QD, KC, VC, torch.tensor([3, 8, 8])), ValueError, "shape"),
    (lambda: ops.decode_attention(QD, KC, VC, [3, 8]), TypeError, "Tensor"),
    (lambda: ops.decode_attention(QD, KC, VC, LENS.to("meta")), ValueError, "device"),
    (lambda: ops.decode_attention(torch.randn(2, 4, 2, 16), KC, VC, LENS), ValueError, "one query"),
    (lambda: ops.decode_attention(QD, KC[..., :8], VC[..., :8], LENS), ValueError, "head dim"),
    (lambda: ops.decode_attention(QD, torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16), LENS),
     ValueError, "multiple"),
    (lambda: ops.decode_attention(QD.half(), KC, VC, LENS), TypeError, "dtype"),
])
def test_attention_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


@pytest.mark.parametrize("be,dev", [p for p in backend_device_pairs() if p.values[0] != "torch"])
def test_custom_ops_pass_opcheck(be, dev):
    """torch.library.opcheck on each attention custom op: schema, autograd registration, and
    that the fake implementation gives the real outputs' shapes, dtypes and strides (the
    Triton kernels write (B, H, T, D) stored as (B, T, H, D), the C++/CUDA ones contiguous;
    torch.compile plans what follows the op by the fake's layout)."""
    import importlib

    A = importlib.import_module("minigpt.ops.attention")
    # q as a model makes it: a head-split view of (B, T, H * D) activations.
    q = torch.randn(2, 7, 4, 16, device=dev).transpose(1, 2)
    k, v = (torch.randn(2, 2, 9, 16, device=dev) for _ in range(2))
    torch.library.opcheck(A._fwd, (q, k, v, True, 0.25, be))
    out, lse = A._fwd_impl(q, k, v, True, 0.25, be)
    do = torch.randn(2, 7, 4, 16, device=dev).transpose(1, 2)
    torch.library.opcheck(A._bwd, (do, q, k, v, out, lse, True, 0.25, be))
    if be in A.DROPOUT_BACKENDS:
        seed = torch.tensor(1234, dtype=torch.int64)
        torch.library.opcheck(A._drop_fwd, (q, k, v, True, 0.25, 0.3, seed, be))
        out, lse = A._drop_fwd_impl(q, k, v, True, 0.25, 0.3, seed, be)
        torch.library.opcheck(A._drop_bwd, (do, q, k, v, out, lse, True, 0.25, 0.3, seed, be))
    lens = torch.tensor([3, 9], dtype=torch.int32, device=dev)
    torch.library.opcheck(A._decode, (q[:, :, :1], k, v, lens, 0.25, be))


# ----------------------------------------------------------------------------------------------
# attention_qkv: the fused projection's output taken whole, one gradient back


def _qkv_case(be, dev, dtype, B, Hq, Hkv, T, D, causal, dropout_p=0.0):
    W = (Hq + 2 * Hkv) * D
    qkv = torch.randn(B, T, W, device=dev).to(dtype).requires_grad_()
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2)
               for t in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=2))
    sc = 1.0 / math.sqrt(D)
    seed = 4321
    torch.manual_seed(seed)
    y = ops.attention_qkv(qkv, Hq, Hkv, causal=causal, backend=be, dropout_p=dropout_p)
    assert y.shape == (B, T, Hq * D) and y.dtype == dtype
    g = torch.randn(B, T, Hq * D, device=dev, dtype=torch.float64)
    (dqkv,) = torch.autograd.grad(y, qkv, g.to(dtype))
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype
    if dropout_p > 0:
        # The same seed, so the same mask, as attention on the split heads.
        torch.manual_seed(seed)
        ref = ops.attention(q, k, v, causal=causal, backend=be, dropout_p=dropout_p)
        ref = ref.transpose(1, 2).reshape(B, T, -1)
        (dref,) = torch.autograd.grad(ref, qkv, g.to(dtype))
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dqkv, dref, rtol=1e-5, atol=1e-5)
        return
    qkv64 = f64(qkv)
    q64, k64, v64 = (t.view(B, T, -1, D).transpose(1, 2)
                     for t in qkv64.split([Hq * D, Hkv * D, Hkv * D], dim=2))
    y64 = reference.attention(q64, k64, v64, causal, sc).transpose(1, 2).reshape(B, T, -1)
    y_lp = _eager(q, k, v, causal, sc).transpose(1, 2).reshape(B, T, -1)
    assert_close(y, y64, y_lp, dtype, "out")
    (d64,) = torch.autograd.grad(y64, qkv64, g)
    (d_lp,) = torch.autograd.grad(y_lp, qkv, g.to(dtype))
    assert_close(dqkv, d64, d_lp, dtype, "dqkv")


QKV_CASES = {"mha-33-d16": (2, 4, 4, 33, 16, True), "gqa3-7-d48": (1, 6, 2, 7, 48, True),
             "mqa-T1-d80": (1, 3, 1, 1, 80, True), "full-100-d32": (2, 2, 2, 100, 32, False)}


@pytest.mark.parametrize("be,dev", PAIRS)
@pytest.mark.parametrize("case", list(QKV_CASES), ids=str)
def test_attention_qkv_matches_reference(be, dev, case):
    _qkv_case(be, dev, torch.float32, *QKV_CASES[case])


@pytest.mark.parametrize("be,dev", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["mha-33-d16", "gqa3-7-d48", "mqa-T1-d80"], ids=str)
def test_attention_qkv_low_precision(be, dev, dtype, case):
    _qkv_case(be, dev, dtype, *QKV_CASES[case])


@pytest.mark.parametrize("be,dev", [p for p in PAIRS if p.values[0] != "cuda"])
def test_attention_qkv_dropout_is_attentions(be, dev):
    _qkv_case(be, dev, torch.float32, 2, 4, 2, 21, 16, True, dropout_p=0.3)


@pytest.mark.parametrize("be,dev", PAIRS)
def test_attention_qkv_compiles_and_passes_opcheck(be, dev):
    def block(qkv):
        return (ops.attention_qkv(qkv, 4, 2, backend=be) * 2).sum()

    qkv = torch.randn(2, 9, 8 * 16, device=dev, requires_grad=True)
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(qkv)
    (grad,) = torch.autograd.grad(out, qkv)
    q, k, v = (t.view(2, 9, -1, 16).transpose(1, 2) for t in qkv.split([64, 32, 32], dim=2))
    ref = (reference.attention(q, k, v) * 2).sum()
    (rgrad,) = torch.autograd.grad(ref, qkv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, rgrad, rtol=1e-5, atol=1e-4)
    if be == "torch":
        return
    import importlib

    A = importlib.import_module("minigpt.ops.attention")
    x = qkv.detach()
    torch.library.opcheck(A._qkv_fwd, (x, 4, 2, True, 0.25, 0.0, None, be))
    o, lse = A._qkv_fwd_impl(x, 4, 2, True, 0.25, 0.0, None, be)
    do = torch.randn(2, 9, 4, 16, device=dev).transpose(1, 2)
    torch.library.opcheck(A._qkv_bwd, (do, x, o, lse, 4, 2, True, 0.25, 0.0, None, be))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: ops.attention_qkv(torch.randn(2, 5, 50), 2, 1, backend="torch"), ValueError,
     "head_dim"),
    (lambda: ops.attention_qkv(torch.randn(2, 5, 60), 3, 2, backend="torch"), ValueError,
     "multiple"),
    (lambda: ops.attention_qkv(torch.randn(5, 48), 2, backend="torch"), ValueError, "3-D"),
    (lambda: ops.attention_qkv(torch.randn(2, 5, 48), 0, backend="torch"), ValueError,
     "n_head"),
    (lambda: ops.attention_qkv(torch.randint(0, 3, (2, 5, 48)), 2), TypeError, "floating"),
    (lambda: ops.attention_qkv(torch.randn(2, 5, 48), 2, dropout_p=1.0), ValueError,
     "dropout_p"),
])
def test_attention_qkv_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


@pytest.mark.parametrize("be,dev", PAIRS)
def test_head_dim_one_views_of_any_stride(be, dev):
    """A head dim of 1 is contiguous to torch at any stride, so .contiguous() kept the view
    and the C++ kernel refused it ("needs a unit stride"): q, k, v, dout and decode's q as
    (..., 1) views with a stride of 5 or 2 must just work, forward and backward."""
    q = torch.randn(1, 2, 1, 5, device=dev).transpose(-1, -2).requires_grad_()  # (1, 2, 5, 1)
    k = torch.randn(1, 2, 3, 2, device=dev)[..., ::2].requires_grad_()          # (1, 2, 3, 1)
    v = torch.randn(1, 2, 3, 1, device=dev).requires_grad_()
    out = ops.attention(q, k, v, causal=False, backend=be)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    dout = torch.randn(1, 2, 1, 10, device=dev)[..., ::2].transpose(-1, -2)   # stride 2 on D
    got = torch.autograd.grad(out, [q, k, v], dout)
    want = torch.autograd.grad(ref, [q, k, v], dout.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-6)
    qd = torch.randn(1, 2, 1, 2, device=dev)[..., ::2]
    kc, vc = torch.randn(1, 2, 6, 1, device=dev), torch.randn(1, 2, 6, 1, device=dev)
    lens = torch.tensor([4], device=dev)
    torch.testing.assert_close(ops.decode_attention(qd, kc, vc, lens, backend=be),
                               reference.decode_attention(qd, kc, vc, lens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("be,dev", PAIRS)
def test_decode_unchecked_int64_lengths_clamp_not_wrap(be, dev):
    # check_lengths=False (or no_host_sync) lets an out-of-range length through; the kernels
    # clamp it to the cache. An int64 2**32 + 2 was narrowed to int32 first, i.e. to 2.
    q = torch.randn(2, 4, 1, 16, device=dev)
    kc, vc = torch.randn(2, 2, 6, 16, device=dev), torch.randn(2, 2, 6, 16, device=dev)
    lens = torch.tensor([2 ** 32 + 2, 3], device=dev)
    got = ops.decode_attention(q, kc, vc, lens, check_lengths=False, backend=be)
    want = reference.decode_attention(q, kc, vc, torch.tensor([6, 3], device=dev))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _garbage_past_lengths(kc, vc, lens):
    """The caches with NaN, +inf and -inf written past each sequence's length (what a
    torch.empty cache may hold), and with zeros there (nothing a correct op may read)."""
    dirty, clean = (kc.clone(), vc.clone()), (kc.clone(), vc.clone())
    for b, n in enumerate(lens.tolist()):
        for t in clean:
            t[b, :, n:] = 0.0
        dirty[0][b, :, n:] = float("nan") if b % 2 else float("inf")
        dirty[1][b, :, n:] = float("-inf") if b % 2 else float("nan")
    return dirty, clean


@pytest.mark.parametrize("be,dev", PAIRS)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_decode_ignores_nan_and_inf_past_the_lengths(be, dev, requires_grad):
    # The reference masked the scores to -inf but p @ v still computed 0 * inf = NaN: the
    # torch backend, and every backend with autograd recording (it runs the reference then),
    # returned all NaN for a cache with garbage past the length, where the kernels ignore it.
    B, Hq, Hkv, S, D = 2, 4, 2, 9, 16
    q = torch.randn(B, Hq, 1, D, device=dev)
    kc, vc = torch.randn(B, Hkv, S, D, device=dev), torch.randn(B, Hkv, S, D, device=dev)
    lens = torch.tensor([5, 2], device=dev)
    (kd, vd), (k0, v0) = _garbage_past_lengths(kc, vc, lens)
    q, kd, vd = (t.requires_grad_(requires_grad) for t in (q, kd, vd))
    out = ops.decode_attention(q, kd, vd, lens, backend=be)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k0, v0))
    want = _eager_decode(q64, k64, v64, lens, 1.0 / math.sqrt(D))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    if requires_grad:
        g = torch.randn_like(want)
        got = torch.autograd.grad(out, (q, kd, vd), g.float())
        wants = torch.autograd.grad(want, (q64, k64, v64), g)
        for name, a, b in zip(("dq", "dk", "dv"), got, wants):
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


def test_decode_gradcheck_with_garbage_past_the_lengths():
    q = torch.randn(2, 2, 1, 5, dtype=torch.float64, requires_grad=True)
    kc = torch.randn(2, 1, 4, 5, dtype=torch.float64)
    vc = torch.randn(2, 1, 4, 5, dtype=torch.float64)
    lens = torch.tensor([3, 1])
    (kd, vd), _ = _garbage_past_lengths(kc, vc, lens)
    kd.requires_grad_(), vd.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.decode_attention(a, b, c, lens, backend="cpu"), (q, kd, vd),
        eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("be,dev", PAIRS)
def test_decode_under_forward_ad_and_torch_func_runs_the_reference(be, dev):
    # decode_attention called its kernel without the guards of the other ops: a dual q's
    # tangent was dropped without a word on the kernel backends, and vmap / jvp failed inside
    # the kernel ("Cannot access data pointer"). Like autograd, they now get the reference.
    import torch.autograd.forward_ad as fwAD

    B, Hq, Hkv, S, D = 2, 4, 2, 7, 16
    q, tq = torch.randn(B, Hq, 1, D, device=dev), torch.randn(B, Hq, 1, D, device=dev)
    kc, vc = torch.randn(B, Hkv, S, D, device=dev), torch.randn(B, Hkv, S, D, device=dev)
    lens = torch.tensor([3, 7], device=dev)

    def ref(q, kc=kc, vc=vc, lens=lens):
        return _eager_decode(q.double(), kc.double(), vc.double(), lens, 1.0 / math.sqrt(D))

    def op(q, kc=kc, vc=vc, lens=lens):
        return ops.decode_attention(q, kc, vc, lens, backend=be)

    want, want_t = torch.func.jvp(ref, (q,), (tq.double(),))
    with fwAD.dual_level():
        out, tangent = fwAD.unpack_dual(op(fwAD.make_dual(q, tq)))
    assert tangent is not None
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent.double(), want_t, rtol=1e-5, atol=1e-5)

    out, tangent = torch.func.jvp(op, (q,), (tq,))
    torch.testing.assert_close(tangent.double(), want_t, rtol=1e-5, atol=1e-5)

    g = torch.func.grad(lambda q: op(q).sum())(q)
    torch.testing.assert_close(g.double(), torch.func.grad(lambda q: ref(q).sum())(q.double()),
                               rtol=1e-5, atol=1e-5)

    # vmap over everything, the lengths too (a batched tensor has no values to check).
    qs, ks, vs = (torch.randn(3, *t.shape, device=dev) for t in (q, kc, vc))
    ls = torch.tensor([[1, 7], [4, 2], [7, 7]], device=dev)
    got = torch.func.vmap(op)(qs, ks, vs, ls)
    torch.testing.assert_close(got.double(), torch.stack([ref(*a) for a in zip(qs, ks, vs, ls)]),
                               rtol=1e-5, atol=1e-5)


def test_decode_on_meta_tensors():
    # host_checks said yes to meta tensors and the length check read them: torch's internal
    # "Cannot copy out of meta tensor; no data!".
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.empty(2, 4, 1, 8, device="meta", dtype=dtype)
        kc = torch.empty(2, 2, 6, 8, device="meta", dtype=dtype)
        for lens_dtype in (torch.int64, torch.int32):
            lens = torch.empty(2, device="meta", dtype=lens_dtype)
            out = ops.decode_attention(q, kc, kc, lens)
            assert out.is_meta and out.shape == (2, 4, 1, 8) and out.dtype == dtype


@pytest.mark.parametrize("scale", [1e39, -3.5e38, 1e300])
def test_scale_beyond_float32_is_refused(scale):
    # Finite as a Python float, inf as the float32 every backend computes in for these dtypes:
    # each backend gave its own mix of NaN and one-hot rows.
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (t.to(dtype) for t in (Q, K, V))
        calls = [lambda: ops.attention(q, k, v, scale=scale),
                 lambda: ops.attention_qkv(torch.randn(1, 5, 48).to(dtype), 1, scale=scale),
                 lambda: ops.decode_attention(QD.to(dtype), KC.to(dtype), VC.to(dtype), LENS,
                                              scale=scale)]
        for be in _backend.available_backends("cpu"):
            calls += [lambda be=be: ops.attention(q, k, v, scale=scale, backend=be),
                      lambda be=be: ops.decode_attention(QD.to(dtype), KC.to(dtype),
                                                         VC.to(dtype), LENS, scale=scale,
                                                         backend=be)]
        for call in calls:
            with pytest.raises(ValueError, match="float32's largest"):
                call()


@pytest.mark.parametrize("be", ["torch", "cpu"])
def test_float64_takes_a_scale_beyond_float32(be):
    # float64 inputs run in float64 with the scale as given on both backends that take them.
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    for scale in (1e39, -1e300):
        out = ops.attention(q, k, v, causal=True, scale=scale, backend=be)
        torch.testing.assert_close(out, _eager(q, k, v, True, scale), rtol=1e-10, atol=1e-12)
        L = torch.tensor([3])
        dec = ops.decode_attention(q[:, :, :1], k, v, L, scale=scale, backend=be)
        torch.testing.assert_close(dec, _eager_decode(q[:, :, :1], k, v, L, scale), rtol=1e-10,
                                   atol=1e-12)


def _spread(shape, dtype, stride_t, device):
    """A random (1, H, T, D) tensor whose positions lie ``stride_t`` elements apart, over a
    storage reserved but never touched beyond them: on the CPU Linux commits only the pages
    written, so a view spanning 2**31 elements costs a few pages, not gigabytes (a GPU
    allocates them: 4 GiB a tensor here)."""
    H, T, D = shape[1:]
    base = torch.empty((T - 1) * stride_t + H * D, dtype=dtype, device=device)
    t = base.as_strided(shape, ((T - 1) * stride_t + H * D, D, stride_t, 1))
    t.copy_(torch.randn(shape))
    return t


@pytest.mark.skipif(not _backend.is_available("triton", "cpu") and not torch.cuda.is_available(),
                    reason="needs Triton (the interpreter or a GPU)")
def test_triton_positions_past_int32_offsets():
    # The Triton kernels take a position's offset (position x stride) in 32-bit arithmetic:
    # a q whose positions lie 2**31 elements apart in all (a view into a wide packed tensor,
    # or 262,145 positions at 8192 wide) segfaulted in the interpreter and would read
    # elsewhere on a GPU. Such tensors are now copied to a layout that fits; the answer is
    # the reference's. Kernel-level calls, so no gradient of the huge storage is made.
    from minigpt.kernels import attention as kern

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, H, T, S, D, scale = torch.float16, 2, 3, 3, 16, 0.25
    far = 2 ** 30 + 64  # the last position lies 2 * far > 2**31 elements past the first
    q, do = (_spread((1, H, T, D), dtype, far, dev) for _ in range(2))
    k, v = (_spread((1, 1, S, D), dtype, far, dev) for _ in range(2))
    assert kern._span(q) >= 2 ** 31 and kern._span(k) >= 2 ** 31
    qc, kc, vc = (t.detach().clone().float().requires_grad_() for t in (q, k, v))
    want = _eager(qc, kc, vc, True, scale)
    want.backward(do.float())
    out, lse = kern.attention_fwd(q, k, v, True, scale)
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
    # The gradients into views as far apart (the q | k | v views of a packed gradient).
    grads = (_spread((1, H, T, D), dtype, far, dev),
             *(_spread((1, 1, S, D), dtype, far, dev) for _ in range(2)))
    got = kern.attention_bwd(do, q, k, v, out, lse, True, scale, grads=grads)
    for g, given, t in zip(got, grads, (qc, kc, vc)):
        assert g is given
        torch.testing.assert_close(g.float(), t.grad, rtol=1e-2, atol=1e-2)
    L = torch.tensor([2], dtype=torch.int32, device=dev)
    dec = kern.decode_attention_fwd(q[:, :, :1], k, v, L, scale)
    torch.testing.assert_close(dec.float(), _eager_decode(qc[:, :, :1], kc, vc, L, scale),
                               rtol=1e-2, atol=1e-2)


def test_triton_layout_for_positions_past_int32_offsets():
    # Outputs and gradients are made (B, T, H, D) underneath (heads_inner); where that puts
    # positions 2**31 elements apart they are made contiguous (B, H, T, D) instead. Only a
    # single head's sequence past 2**31 elements is refused. Meta tensors: shapes and strides.
    from minigpt.kernels import attention as kern

    small = kern.heads_inner(2, 64, 4096, 128, torch.bfloat16, "meta")
    assert small.stride() == (4096 * 64 * 128, 128, 64 * 128, 1)
    big = kern.heads_inner(1, 64, 262145, 128, torch.bfloat16, "meta")
    assert big.is_contiguous() and kern._span(big) < 2 ** 31
    assert kern.fit_int32(small) is small
    wide = torch.empty(1, 262145, 64, 128, device="meta").transpose(1, 2)
    fitted = kern.fit_int32(wide)
    assert fitted.is_contiguous() and fitted.shape == wide.shape
    with pytest.raises(ValueError, match=r"holds 2,147,483,776 elements .* backend='cuda'"):
        kern.fit_int32(torch.empty(1, 1, 2 ** 24 + 1, 128, device="meta"))
    with pytest.raises(ValueError, match="past the 2\\*\\*31"):
        kern.heads_inner(1, 1, 2 ** 24 + 1, 128, torch.bfloat16, "meta")
