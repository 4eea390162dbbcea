"""Special values (inf, NaN, all -inf rows, magnitudes near the format's limit) through the ops,
forward and backward, against minigpt.reference: where the reference is finite a backend must
give the same numbers; where it is NaN, NaN in the same places (a NaN input that comes out
finite is a silent wrong answer). Tiny shapes: the triton backend runs in the interpreter. On a
GPU the same cases run through the compiled Triton kernels and the CUDA backend on the cuda
device (ids ``triton-cuda`` / ``cuda-cuda``): the emulator runs the CUDA sources' logic, not
the hardware's fmaxf, fast-math exp or tensor cores."""
import math

import pytest
import torch

from minigpt import ops, reference
from minigpt._backend import available_backends

INF, NAN = float("inf"), float("nan")
# (backend, device): the kernel backends on the CPU (Triton in the interpreter) and on a GPU.
KERNELS = [pytest.param("cpu", "cpu", id="cpu"), pytest.param("triton", "cpu", id="triton"),
           pytest.param("triton", "cuda", id="triton-cuda"),
           pytest.param("cuda", "cuda", id="cuda-cuda")]


def _need(backend, device="cpu"):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    if backend not in available_backends(device):
        pytest.skip(f"backend {backend} unavailable on {device}")


def _on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def _same(got, want, tol=1e-5):
    """NaN exactly where want has NaN, the rest equal within tol (inf included)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (
        f"NaN at {torch.isnan(got).nonzero().tolist()}, want {torch.isnan(want).nonzero().tolist()}")
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], rtol=tol, atol=tol)


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.device)))


# ---- softmax ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", [pytest.param("torch", "cpu", id="torch")] + KERNELS)
def test_softmax_all_neginf_row_has_zero_gradient(backend, device):
    """The reference defines a row of all -inf as zeros; its gradient is 0 (it was NaN in the
    torch backend: torch.softmax's NaN came back through the backward), as the kernels give."""
    _need(backend, device)
    x = torch.randn(3, 5)
    x[1] = -INF
    dy = torch.randn(3, 5)
    y, dx = _grads(lambda t: ops.softmax(t, backend=backend), _on(device, x), dy)
    y, dx = y.cpu(), dx.cpu()
    assert torch.equal(y[1], torch.zeros(5))
    assert torch.equal(dx[1], torch.zeros(5))
    _, want = _grads(lambda t: torch.softmax(t, -1), [x[[0, 2]]], dy[[0, 2]])
    torch.testing.assert_close(dx[[0, 2]], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_scale_zero_is_uniform_at_huge_values(dtype):
    """scale 0: softmax(0 * x) is uniform for any finite x. The C++ kernel computed
    (x - max) * 0, which is NaN where x - max overflows (|x| past 1.7e38)."""
    _need("cpu")
    x = torch.tensor([[3e38, -3e38, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0]]).to(dtype)
    y = ops.softmax(x, scale=0.0, backend="cpu")
    torch.testing.assert_close(y, reference.softmax(x, scale=0.0))
    assert torch.equal(y.float(), torch.full((2, 4), 0.25))


# ---- swiglu -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_up_gradient_at_hugely_negative_gate(backend, device, dtype):
    """d up = dy * silu(gate): silu(-3e38) is -0, so the gradient is 0. dy * gate first
    overflows to inf and inf * sigmoid(-3e38) = inf * 0 was NaN (the C++ kernel)."""
    _need(backend, device)
    gate = torch.tensor([-3e38, -3e38, 3e38, 1.0]).to(dtype)
    up = torch.tensor([1.0, -2.0, 0.5, 3.0]).to(dtype)
    dy = torch.tensor([2.0, 4.0, 1.0, 1.0]).to(dtype)
    _, dg, du = _grads(lambda g, u: ops.swiglu(g, u, backend=backend), _on(device, gate, up), dy)
    _, dg_ref, du_ref = _grads(reference.swiglu, [gate, up], dy)
    _same(du, du_ref)
    assert torch.equal(du[:2].cpu().float(), torch.zeros(2))
    _same(dg, dg_ref)


# ---- attention --------------------------------------------------------------------------------
def _attn_case(kind):
    """(q, k, v, causal) of one special case, fp32, one batch item and two heads."""
    g = torch.Generator().manual_seed(0)
    if kind == "k_nan":      # keys of head 0: one NaN, so every row of head 0 is NaN
        q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
        k[0, 0, 1, 2] = NAN
        return q, k, v, False
    if kind == "q_nan":      # query 2 of head 0 NaN; under causal it does not see keys 3, 4
        q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
        q[0, 0, 2, 0] = NAN
        return q, k, v, True
    if kind == "v_nan_unseen":  # T > S causal: queries 0..2 see no key; a NaN value in key 2
        q = torch.randn(1, 2, 6, 16, generator=g)
        k, v = (torch.randn(1, 2, 3, 16, generator=g) for _ in range(2))
        v[0, 0, 2, 0] = NAN
        return q, k, v, True
    raise ValueError(kind)


ATTN_CASES = ["k_nan", "q_nan", "v_nan_unseen"]
# What each case compares. The reference's own artifacts are left out: softmax of a NaN row is
# NaN on its masked pairs too, so its dV of keys the NaN query cannot see is NaN (q_nan); and
# p @ v gives 0 * NaN = NaN for a query that sees no key when v holds a NaN (v_nan_unseen).
CHECKED = {"k_nan": ("out", "dq", "dk", "dv"), "q_nan": ("out", "dq", "dk"),
           "v_nan_unseen": ("dq", "dk", "dv")}


# fp32 everywhere; fp16 on a GPU too, where the CUDA backend and Triton take the tensor cores.
ATTN_KERNELS = [pytest.param(*p.values, torch.float32, id=f"{p.id}-fp32") for p in KERNELS] + [
    pytest.param(*p.values, torch.float16, id=f"{p.id}-fp16") for p in KERNELS[2:]]


@pytest.mark.parametrize("kind", ATTN_CASES)
@pytest.mark.parametrize("backend,device,dtype", ATTN_KERNELS)
def test_attention_nan_stays_where_the_reference_has_it(backend, device, dtype, kind):
    """k_nan: a NaN row's lse was stored as +inf (the `l > 0` test is false for NaN), so the
    backward's P was 0 and dV finite where the reference's is NaN. q_nan / v_nan_unseen:
    dS = P * (dP - delta) with P = 0 on masked pairs is NaN when dP or delta is: the NaN
    reached dK of keys the NaN query cannot see, and dQ of queries that see no key."""
    _need(backend, device)
    q, k, v, causal = (t.to(dtype) if torch.is_tensor(t) else t for t in _attn_case(kind))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _grads(lambda *t: ops.attention(*t, causal=causal, backend=backend),
                 _on(device, q, k, v), do)
    want = _grads(lambda *t: reference.attention(*t, causal=causal), [q, k, v], do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        if name not in CHECKED[kind]:
            continue
        try:
            _same(a, b, tol=1e-4 if dtype == torch.float32 else 2e-2)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    # The NaN stays in head 0: head 1 is an ordinary, finite head.
    assert all(torch.isfinite(t[:, 1]).all() for t in got)


# ---- CUDA kernels through the emulator --------------------------------------------------------
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("kind", ATTN_CASES)
def test_attention_cuda_emulated_nan_stays_where_the_reference_has_it(cuda_emu, kind, dtype):
    """The same through csrc/attention_cuda.cu (fp32: the CUDA-core kernels; fp16 at D 16: the
    tensor-core ones), the forward's own lse feeding the backward."""
    from tests.test_cuda_emu_attention import _bwd, _fwd

    q, k, v, causal = _attn_case(kind)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = _fwd(cuda_emu, q, k, v, causal, scale)
    _, dq, dk, dv = _bwd(cuda_emu, do, q, k, v, out.clone(), lse.clone(), causal, scale)
    want = _grads(lambda *t: reference.attention(*t, causal=causal, scale=scale), [q, k, v], do)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        if name not in CHECKED[kind]:
            continue
        try:
            _same(a, b, tol=tol)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("D", [16, 18], ids=["D16-vec", "D18-warp"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
def test_decode_cuda_emulated_nan_stays_where_the_reference_has_it(cuda_emu, dtype, D):
    """Flash-decoding on CUDA (csrc/attention_cuda.cu: the 16-byte-pack kernel at D 16, the
    warp-per-head one at D 18, split over several blocks): a NaN in q or in a key within the
    length made the whole row 0, not NaN. fmaxf drops NaN, so the running max stayed -inf,
    the split's lse was stored as -inf and the combine weighted it 0. The other rows stay
    the reference's numbers."""
    from tests.test_cuda_emu_attention import _decode, _decode_inputs

    q, kc, vc = (t.clone() for t in _decode_inputs(2, 4, 2, 40, D, dtype, "contig"))
    q[0, 1, 0, 3] = NAN          # one query head of batch 0
    kc[1, 0, 5, 2] = NAN         # a key inside batch 1's length: its kv head's 2 query heads
    kc[0, 1, 35, 0] = NAN        # a key past batch 0's length: nothing
    lens = torch.tensor([30, 20], dtype=torch.int32)
    want = reference.decode_attention(q.double(), kc.double(), vc.double(), lens, 0.25)
    assert torch.isnan(want).any() and not torch.isnan(want).all()
    out, _ = _decode(cuda_emu, q, kc, vc, lens, 2, 20, 0.25)
    _same(out, want, tol=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("D", [16, 18])
@pytest.mark.parametrize("backend,device,dtype", ATTN_KERNELS)
def test_decode_nan_stays_where_the_reference_has_it(backend, device, dtype, D):
    """The flash-decoding case above through minigpt.ops on each kernel backend (on a GPU: the
    compiled kernels, whose max is the hardware's fmaxf)."""
    _need(backend, device)
    from tests.test_cuda_emu_attention import _decode_inputs

    q, kc, vc = (t.clone() for t in _decode_inputs(2, 4, 2, 40, D, dtype, "contig"))
    q[0, 1, 0, 3] = NAN
    kc[1, 0, 5, 2] = NAN
    kc[0, 1, 35, 0] = NAN
    lens = torch.tensor([30, 20], dtype=torch.int32)
    want = reference.decode_attention(q.double(), kc.double(), vc.double(), lens, 0.25)
    out = ops.decode_attention(*_on(device, q, kc, vc, lens), scale=0.25, backend=backend)
    _same(out, want, tol=1e-5 if dtype == torch.float32 else 2e-3)


# ---- cross-entropy ----------------------------------------------------------------------------
def _ce_nan_case(V):
    """Logits (3, V), targets 2: a lone NaN logit (row 0); NaN in every column from 4 on (row 1),
    so whole threads (CUDA: a column or a pack a thread) and, at V 1024, a whole 512-column block
    (C++) see only NaN; a finite row (row 2)."""
    x = torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 5] = NAN
    x[1, 4:] = NAN
    return x, torch.full((3,), 2)


def _ce_huge_case(dtype):
    """Logits (4, V) of one value each, near the format's limit and at a large offset, targets 2
    (the reference: log V, for any smoothing); a finite row (row 3)."""
    big = 3e38 if dtype != torch.float16 else 6e4
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    x[0], x[1], x[2] = big, -big, 1e30 if dtype != torch.float16 else 3e4
    return x.to(dtype), torch.full((4,), 2)


def _ce_want(x, t, eps=0.0):
    return _grads(lambda z: reference.cross_entropy(z, t, reduction="none", label_smoothing=eps),
                  [x], torch.ones(t.shape))


@pytest.mark.parametrize("V", [7, 1024])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_cross_entropy_nan_logit_makes_the_row_nan(backend, device, V):
    """The C++ kernel skipped a 512-column block whose max was -inf; std::max drops NaN, so a
    block of only NaN counted as empty and the row's loss came out finite (14.0, V 1024)."""
    _need(backend, device)
    x, t = _ce_nan_case(V)
    got = _grads(lambda z: ops.cross_entropy(z, t.to(device), reduction="none", backend=backend),
                 _on(device, x), torch.ones(3))
    for name, a, b in zip(("loss", "grad"), got, _ce_want(x, t)):
        try:
            _same(a, b)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,device", KERNELS)
def test_cross_entropy_label_smoothing_at_huge_logits(backend, device, dtype):
    """The smoothing term took the row's sum of logits: it overflowed at 3e38 (-inf or +inf
    loss) and cancelled to garbage at a common offset of 1e30 (M - sum(x) / V off by ~1e23),
    where the reference, summing x - lse, gives log V. It is sum(x - x_t) now."""
    _need(backend, device)
    x, t = _ce_huge_case(dtype)
    got = _grads(lambda z: ops.cross_entropy(z, t.to(device), reduction="none",
                                             label_smoothing=0.1, backend=backend),
                 _on(device, x), torch.ones(4))
    want = _ce_want(x, t, 0.1)
    assert torch.allclose(want[0][:3], torch.full((3,), math.log(7)))
    _same(got[0], want[0])
    _same(got[1], want[1], tol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("V", [7, 1024])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16")])
def test_cross_entropy_cuda_emulated_nan_logit_makes_the_row_nan(cuda_emu, dtype, V):
    """csrc/cross_entropy_cuda.cu: a thread that saw only NaN kept m = -inf, and its share of
    the sum of exp was taken as 0 (block_max's fmaxf drops NaN from the row max too): a row
    with a NaN logit other than the target's got a finite loss, and a finite gradient
    everywhere but the NaN's own columns. V 7: one column a thread; 1024: one pack a thread."""
    from tests.test_cuda_emu_training_ops import ce_call

    x, t = _ce_nan_case(V)
    x = x.to(dtype)
    loss, grad = ce_call(cuda_emu, x, t, "buffer", -100, 0.0, 1.0)
    want = _ce_want(x, t)
    _same(loss, want[0])
    _same(grad, want[1], tol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
def test_cross_entropy_cuda_emulated_label_smoothing_at_huge_logits(cuda_emu, dtype):
    """The same as test_cross_entropy_label_smoothing_at_huge_logits, through the CUDA kernel."""
    from tests.test_cuda_emu_training_ops import ce_call

    x, t = _ce_huge_case(dtype)
    loss, grad = ce_call(cuda_emu, x, t, "buffer", -100, 0.1, 1.0)
    want = _ce_want(x, t, 0.1)
    _same(loss, want[0])
    _same(grad, want[1], tol=1e-5 if dtype == torch.float32 else 2e-2)
