"""Large tensors and launch-grid limits, on every backend, kept cheap in time and memory.

- Offsets past 2**31 elements: strided views over a ``torch.empty`` storage whose last element
  lies more than 2**31 elements past the first. Only the viewed elements are written, so only
  their pages become resident (the rest is reserved address space; needs the kernel's memory
  overcommit, which the fixture checks), and the kernels that take strides read only those.
- CUDA grid limits (y and z: 65535 blocks): the CUDA emulator (tests/cuda_emu) enforces them
  like a GPU, and lowers them for a test (minigpt_emu_set_max_grid_yz), so that a launcher's
  handling of the limit is reached with a handful of blocks instead of 65536 (a GPU would need
  over a million queries for the attention kernels).
- Sums over many rows: the norm backwards' weight/bias gradients over 2^20 narrow rows.
"""
import math

import pytest
import torch

from minigpt import ops, reference
from tests._tol import assert_close
from tests.conftest import skip_if_triton_refused
from tests.test_cuda_emu_attention import (_backward_case, _bwd, _check_lse, _f64, _fwd, _lse_ref,
                                           _qkv, _ref_grads)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FAR = 2**31  # elements between a view's first item and its next one: past int32 offsets


@pytest.fixture(scope="module")
def far_storage_ok():
    """Whether this machine reserves a > 2**31-element storage without committing it."""
    try:
        torch.empty(FAR + 4096, dtype=F32)
    except RuntimeError as e:  # no overcommit: the test would need real memory
        pytest.skip(f"cannot reserve a {FAR + 4096}-element storage: {e}")


def far_view(shape, stride, dtype):
    """A view with ``stride`` over an empty storage just large enough, only its elements set
    (random normal): a few pages resident, however far apart they lie."""
    n = sum((s - 1) * st for s, st in zip(shape, stride)) + 1
    view = torch.empty(n, dtype=dtype).as_strided(shape, stride)
    view.copy_(torch.randn(shape).to(dtype))
    return view


# ---- strided views whose elements lie past 2**31 elements ------------------------------------
# rope and attention take their inputs through strides (the other ops take contiguous rows);
# every index they form is 64-bit: these guard that.
@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=skip_if_triton_refused)])
def test_rope_far_strided_views(far_storage_ok, backend):
    B, Hq, T, D = 2, 2, 3, 8
    q = far_view((B, Hq, T, D), (FAR, FAR // 2 + 64, D, 1), F16)  # batch 1 at 2**31
    k = far_view((B, 1, T, D), (FAR + 8, T * D, D, 1), F16)
    cos, sin = torch.randn(T, D), torch.randn(T, D)
    want = reference.rope(q.double(), k.double(), cos.double(), sin.double())
    lowp = reference.rope(q, k, cos, sin)
    for got, w64, wl, name in zip(ops.rope(q, k, cos, sin, backend=backend), want, lowp,
                                  ("q", "k")):
        assert_close(got, w64, wl, F16, name=name)


def test_cpu_attention_far_strided_views(far_storage_ok):
    B, Hq, T, D = 2, 2, 5, 16
    q = far_view((B, Hq, T, D), (FAR, FAR // 2 + 64, D, 1), F32).requires_grad_()
    k = far_view((B, 1, T, D), (FAR + 16, T * D, D, 1), F32).requires_grad_()
    v = far_view((B, 1, T, D), (FAR + 32, T * D, D, 1), F32).requires_grad_()
    do = torch.randn(B, Hq, T, D)
    out = ops.attention(q, k, v, causal=True, backend="cpu")
    grads = torch.autograd.grad(out, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*leaves, True, 1 / math.sqrt(D))
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)

    qd = far_view((B, Hq, 1, D), (FAR, FAR // 2 + 64, D, 1), F32)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    got = ops.decode_attention(qd, k.detach(), v.detach(), lens, backend="cpu")
    want = reference.decode_attention(qd.double(), k.detach().double(), v.detach().double(),
                                      lens, 1 / math.sqrt(D))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ---- CUDA attention: sequence blocks past the grid's y limit ----------------------------------
@pytest.fixture
def emu_small_yz(cuda_emu):
    """The emulator with grid y and z limited to 2 blocks (65535 on a GPU), restored after."""
    cuda_emu.lib.minigpt_emu_set_max_grid_yz(2)
    try:
        yield cuda_emu
    finally:
        cuda_emu.lib.minigpt_emu_set_max_grid_yz(65535)


# Three sequence blocks of every kernel: the CUDA-core ones (fp32) take 16 queries a forward/dQ
# block and 32 keys a dK/dV block, the tensor-core ones (bf16, D <= 128) 64 of each. Batch 2
# and a GQA group of 2 so that a block's (batch, head) and sequence block are both checked.
YZ_CASES = [pytest.param(F32, 40, 70, id="fp32-cuda-cores"),
            pytest.param(BF16, 130, 130, id="bf16-tensor-cores")]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,T,S", YZ_CASES)
def test_cuda_attention_sequence_blocks_past_grid_y_limit(emu_small_yz, dtype, T, S, causal):
    """The CUDA attention kernels launched their sequence blocks on grid y, limited to 65535:
    a forward of more than 1,048,560 queries (16 a block) failed to launch ("invalid
    configuration argument"), a backward of more than 2,097,120 keys too."""
    emu = emu_small_yz
    q, k, v = _qkv(2, 2, 1, T, S, 32, dtype, "bthd")
    scale = 1.0 / math.sqrt(32)
    out, lse = _fwd(emu, q, k, v, causal, scale)
    assert all(y <= 2 and z <= 2 for _, y, z, _, _ in emu.launches())
    assert_close(out, reference.attention(*_f64(q, k, v), causal, scale),
                 reference.attention(q, k, v, causal, scale), dtype)
    _check_lse(lse, q, k, v, causal, scale)

    _backward_case(emu, dtype, 2, 2, 1, T, S, 32, "bthd", causal, "bthd")
    assert all(y <= 2 and z <= 2 for _, y, z, _, _ in emu.launches())



@pytest.mark.parametrize("entry", ["fwd", "bwd"])
def test_cuda_attention_refuses_grid_past_x_limit(cuda_emu, entry):
    """A geometry whose blocks pass grid x's 2^31 - 1 (2^32 + 1 sequence blocks of one head)
    is refused before anything runs: cast to unsigned, the block count became 1 and the launch
    computed one block and returned success. The buffers hold that one block only."""
    from tests.test_cuda_emu_attention import _geo
    q, k, v = _qkv(1, 1, 1, 16, 32, 32, F32, "contig")
    g = _geo(q, k, v, False)
    blocks = 2**32 + 1
    if entry == "fwd":
        g.T = 16 * blocks  # 16 queries a forward block
        out, lse = torch.full_like(q, float("nan")), torch.full((1, 1, 16), float("nan"))
        args = ("minigpt_attention_fwd_cuda", g, q, k, v, out, lse, 0.25, 0, None)
        outs = (out, lse)
    else:
        g.S = 32 * blocks  # 32 keys a dK/dV block
        do, lse = torch.randn_like(q), torch.zeros(1, 1, 16)
        delta, dq = torch.full((1, 1, 16), float("nan")), torch.full_like(q, float("nan"))
        dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
        args = ("minigpt_attention_bwd_cuda", g, do, *do.stride()[:3], q, k, v, q, lse, delta,
                dq, dk, dv, 0.25, 0, None)
        outs = (delta, dq, dk, dv)
    with pytest.raises(RuntimeError, match="CUDA error 9"):
        cuda_emu.call(*args)
    assert cuda_emu.launches() == []
    assert all(torch.isnan(t).all() for t in outs)
    # The real geometry over the same buffers runs and matches the reference.
    if entry == "fwd":
        got, _ = _fwd(cuda_emu, q, k, v, False, 0.25)
        assert_close(got, reference.attention(*_f64(q, k, v), False, 0.25),
                     reference.attention(q, k, v, False, 0.25), F32)
    else:
        ref_out, lowp = _ref_grads(q, k, v, do, False, 0.25)
        _, lse32 = _lse_ref(q, k, v, False, 0.25)
        _, truth = _ref_grads(*_f64(q, k, v, do), False, 0.25)
        _, *grads = _bwd(cuda_emu, do, q, k, v, ref_out.contiguous(), lse32.float().contiguous(),
                         False, 0.25)
        for name, got, g64, gl in zip(("dq", "dk", "dv"), grads, truth, lowp):
            assert_close(got, g64, gl, F32, name=name)


# ---- CUDA row kernels: more rows than grid x holds ---------------------------------------------
def _row_launches(M, x, out, rows):
    """(launcher, args) of every kernel with a block per row, for M rows (B * T positions for
    rope) over buffers with one real row: a launcher that refuses M never touches them."""
    w = torch.ones(x.shape[-1])
    code = 0  # fp32
    target = torch.zeros(1, dtype=torch.int64)
    return [
        ("minigpt_softmax_fwd_cuda", (x, out, M, 8, 1.0, 0, 1, code, None)),
        ("minigpt_softmax_bwd_cuda", (x, x, out, M, 8, 1.0, code, None)),
        ("minigpt_layer_norm_fwd_cuda", (x, None, w, None, out, None, rows, rows, M, 8, 1e-5,
                                         code, code, None)),
        ("minigpt_rms_norm_fwd_cuda", (x, None, w, out, None, rows, M, 8, 1e-5, code, code,
                                       None)),
        ("minigpt_cross_entropy_fwd_cuda", (x, target, None, rows, M, 8, -100, 0.0, 1.0, code,
                                            None)),
        # B = 1, T = M positions of one head of D = 8
        ("minigpt_rope_cuda", (x, x, out, out, w, w, None, 1, 1, 1, M, 8, 8 * M, 8 * M, 8,
                               8 * M, 8 * M, 8, 0, 0, M, 0, code, None)),
    ]


@pytest.mark.parametrize("i", range(6), ids=["softmax_fwd", "softmax_bwd", "layer_norm_fwd",
                                             "rms_norm_fwd", "cross_entropy_fwd", "rope"])
def test_cuda_row_kernels_refuse_rows_past_grid_x(cuda_emu, i):
    """A block per row: `<<<M, ...>>>` cast M to an unsigned int, so 2^32 + 1 rows launched one
    block, computed row 0 and returned success with every other row unwritten. Now refused
    (cudaErrorInvalidConfiguration, 9) before anything runs; 2^31 - 1 rows is the limit."""
    x = torch.randn(1, 8)
    out = torch.full((1, 8), float("nan"))
    rows = torch.full((1,), float("nan"))
    name, args = _row_launches(2**32 + 1, x, out, rows)[i]
    with pytest.raises(RuntimeError, match="CUDA error 9"):
        cuda_emu.call(name, *args)
    assert cuda_emu.launches() == []
    assert torch.isnan(out).all() and torch.isnan(rows).all()
    # The same call for the row that exists runs and computes it.
    name, args = _row_launches(1, x, out, rows)[i]
    cuda_emu.call(name, *args)
    w = torch.ones(8)
    y = reference.softmax(x)
    want = {"minigpt_softmax_fwd_cuda": (out, y),
            "minigpt_softmax_bwd_cuda": (out, x * (x - (x * x).sum(-1, keepdim=True))),
            "minigpt_layer_norm_fwd_cuda": (out, reference.layer_norm(x, w)),
            "minigpt_rms_norm_fwd_cuda": (out, reference.rms_norm(x, w, eps=1e-5)),
            "minigpt_cross_entropy_fwd_cuda": (rows, reference.cross_entropy(
                x, torch.zeros(1, dtype=torch.int64), reduction="none")),
            # cos = sin = 1: y1 = x1 - x2, y2 = x2 + x1
            "minigpt_rope_cuda": (out, reference.rope(x.view(1, 1, 1, 8), x.view(1, 1, 1, 8),
                                                      w.view(1, 8), w.view(1, 8))[0].view(1, 8)),
            }[name]
    torch.testing.assert_close(*want, rtol=1e-5, atol=1e-5)


# ---- norm backwards: weight/bias gradients summed over a million rows --------------------------
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_cpu_norm_weight_grads_over_many_rows(op):
    """dweight and dbias sum over every row. The C++ backward split the rows into one block per
    thread (csrc/common.h row_blocks), each summing its rows one after another in fp32: over
    2^20 rows on 2 threads dbias came out 0.4% off (1.7% at 2^22), dweight 4e-6. Narrow rows
    keep this cheap (8 MB)."""
    M, N = 2**20, 2
    # dy = 0.1 everywhere: dbias adds 0.1 a row; positive rows give dweight terms of one sign
    # for RMSNorm too, so that neither sum's rounding errors cancel out by chance.
    x = torch.randn(M, N) if op == "layer_norm" else torch.rand(M, N) + 0.5
    w = torch.randn(N).requires_grad_()
    b = torch.randn(N).requires_grad_() if op == "layer_norm" else None
    leaves = [t for t in (w, b) if t is not None]

    def grads(xx, ll, backend):
        fn = getattr(ops if backend else reference, op)
        y = fn(xx, *ll, backend=backend) if backend else fn(xx, *ll)
        return torch.autograd.grad((y * 0.1).sum(), ll)

    got = grads(x, leaves, "cpu")
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    truth = grads(x.double(), leaves64, None)
    eager = grads(x, leaves, None)
    for name, g, g64, gl in zip(("dweight", "dbias"), got, truth, eager):
        assert_close(g, g64, gl, F32, name=name)


def test_triton_norm_bwd_programs_bound_rows():
    """The Triton norm backwards' slices (kernels/_util.bwd_programs) likewise: the interpreter's
    4 programs took 2^18 rows each of 2^20, and a GPU's (a few per SM) passed 1024 rows each
    from ~2.7e5 rows on.
    The kernels themselves are too slow to run at that size in the interpreter: the launch
    decision is checked (the kernels take any number of programs)."""
    from minigpt.kernels._util import bwd_programs
    for M in (2**20, 2**20 + 5, 5 * 1024 + 1, 7):
        for rows in (1, 2, 16, 4096):
            P, per = bwd_programs(torch.device("cpu"), M, rows)
            assert per % rows == 0 and P * per >= M > (P - 1) * per
            assert per <= max(rows, 1024), (M, rows, P, per)

