"""csrc/attention_cuda.cu (forward, backward, flash-decoding) run through the CPU CUDA emulator
(tests/cuda_emu) against minigpt.reference. Each call is set up the way the WITH_CUDA branches
of csrc/attention.cpp do it: MgAttnGeo from make_geo/cuda_geo (element strides of q, k, v, which
may be any views with a unit last stride), out and lse contiguous (B, Hq, T[, D]), lse fp32 in
natural log, a (B, Hq, T) fp32 delta scratch and dout's own strides for the backward, and for
decode o_part (B, Hq, nsplit, D) / lse_part (B, Hq, nsplit) fp32 scratch with nsplit and
split_len as decode_attention_fwd picks them from the GPU's SM count. Inputs and outputs sit in
NaN guard bands (and strided inputs have NaN in their gaps), so a read or write out of bounds
shows up.

Semantics for a query that sees no key (causal with T > S): zero output and lse = +inf, as
minigpt/reference (zeros) and the C++ CPU kernel (zeros, +inf) give."""
import math

import pytest
import torch

from minigpt import reference
from minigpt.reference.softmax import causal_mask
from tests._tol import assert_close
from tests.cuda_emu import build as B

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(F16, id="fp16"),
          pytest.param(BF16, id="bf16")]
H100_SMS = 132


# ---- inputs laid out as the callers pass them ----------------------------------------------------
def _heads(Bn, H, L, D, dtype, layout, which=0):
    """A (Bn, H, L, D) view with a unit last stride.
    contig: plain. bthd: a (Bn, L, H, D) tensor transposed (the model's layout). packed: head
    `which` of a fused (Bn, L, 2, H, D) projection (kv packed: k is which=0, v which=1). padded:
    rows of a (Bn, H, L, D + 8) tensor, so rows are not D apart. offset: contiguous but one
    element into its storage (no 16-byte aligned rows). mixed: k (which=0) as bthd and
    v as padded, so a kernel that read v with k's strides fails."""
    if layout == "contig":
        return torch.randn(Bn, H, L, D).to(dtype)
    if layout == "bthd":
        return torch.randn(Bn, L, H, D).to(dtype).transpose(1, 2)
    if layout == "packed":
        return torch.randn(Bn, L, 2, H, D).to(dtype)[:, :, which].transpose(1, 2)
    if layout == "padded":
        return torch.randn(Bn, H, L, D + 8).to(dtype)[..., :D]
    if layout == "offset":  # one element into its storage: rows not 16-byte aligned
        return torch.randn(Bn * H * L * D + 1).to(dtype)[1:].view(Bn, H, L, D)
    if layout == "mixed":  # k, v (and q, dout) each strided differently
        return _heads(Bn, H, L, D, dtype, ("bthd", "padded")[which])
    raise ValueError(layout)


def _qkv(Bn, Hq, Hkv, T, S, D, dtype, layout):
    q = _heads(Bn, Hq, T, D, dtype, "bthd" if layout == "packed" else layout)
    k = _heads(Bn, Hkv, S, D, dtype, layout, 0)
    v = _heads(Bn, Hkv, S, D, dtype, layout, 1)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    return q, k, v


def _geo(q, k, v, causal):
    """csrc/attention.cpp make_geo + cuda_geo."""
    g = B.MgAttnGeo()
    g.B, g.Hq, g.T, g.D = q.shape
    g.Hkv, g.S = k.shape[1], k.shape[2]
    g.qb, g.qh, g.qt = q.stride()[:3]
    g.kb, g.kh, g.ks = k.stride()[:3]
    g.vb, g.vh, g.vs = v.stride()[:3]
    g.causal = 1 if causal else 0
    return g


def _f64(*ts):
    return [t.double() for t in ts]


def _lse_ref(q, k, v, causal, scale):
    """Natural-log logsumexp of each query's visible scaled scores, in float64 and float32 (from
    the same inputs); +inf where a query sees no key (the CPU kernel's and the CUDA kernel's
    convention, which makes the backward's exp(s - lse) exactly 0 there)."""
    out = []
    for dt in (torch.float64, torch.float32):
        rep = q.shape[1] // k.shape[1]
        kf = k.to(dt).repeat_interleave(rep, dim=1)
        s = q.to(dt) @ kf.transpose(-1, -2) * scale
        if causal:
            s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device),
                              float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        out.append(lse.masked_fill(torch.isneginf(lse), float("inf")))
    return out


def _sees_no_key(T, S, causal):
    """(T,) bool: queries that see no key (causal aligned to the end, T > S)."""
    i = torch.arange(T)
    return (i + S - T < 0) if causal else torch.zeros(T, dtype=torch.bool)


def _fwd(emu, q, k, v, causal, scale):
    """attention_fwd's WITH_CUDA branch; returns (out, lse) checked for guard writes."""
    Bn, Hq, T, D = q.shape
    qg, kg, vg = B.guarded(q), B.guarded(k), B.guarded(v)
    out = B.guarded_empty((Bn, Hq, T, D), q.dtype)
    lse = B.guarded_empty((Bn, Hq, T), F32)
    emu.call("minigpt_attention_fwd_cuda", _geo(qg, kg, vg, causal), qg, kg, vg,
             out, lse, scale, B.DTYPE_CODES[q.dtype], None)
    B.check_guards(out, lse)
    return out, lse


def _check_lse(lse, q, k, v, causal, scale):
    lse64, lse32 = _lse_ref(q, k, v, causal, scale)
    empty = torch.isinf(lse64)
    assert torch.equal(torch.isposinf(lse), empty), "lse = +inf exactly on the rows that see no key"
    if (~empty).any():
        assert_close(lse[~empty], lse64[~empty], lse32[~empty], F32, name="lse")


# ---- forward --------------------------------------------------------------------------------------
# (B, Hq, Hkv, T, S, D, layout): every T, S in {1, 7, 33, 100} appears, T < S and T > S, GQA
# 1/3/4, head dims 16/48/64/80/128/256 (NS = 2, 4, 8 and lanes past D masked).
FWD_SHAPES = [
    pytest.param(1, 2, 2, 100, 100, 64, "contig", id="T100-S100-D64"),
    pytest.param(2, 6, 2, 7, 33, 48, "bthd", id="T7-S33-D48-gqa3"),
    pytest.param(1, 4, 1, 33, 7, 80, "packed", id="T33-S7-D80-gqa4"),
    pytest.param(2, 3, 1, 1, 100, 128, "padded", id="T1-S100-D128-gqa3"),
    pytest.param(1, 2, 1, 100, 1, 16, "bthd", id="T100-S1-D16-gqa2"),
    pytest.param(1, 1, 1, 1, 1, 64, "contig", id="T1-S1"),
    pytest.param(2, 4, 2, 33, 33, 64, "mixed", id="T33-S33-D64-gqa2-mixed"),
    pytest.param(1, 3, 1, 33, 100, 256, "packed", id="T33-S100-D256-gqa3"),
    pytest.param(1, 2, 1, 100, 33, 256, "contig", id="T100-S33-D256"),
    # 16-bit: the tensor-core kernel's element-wise staging (D not whole 16-byte packs; rows
    # off 16-byte boundaries), over several 64-query blocks and 64-key tiles
    pytest.param(1, 4, 2, 70, 70, 20, "padded", id="T70-S70-D20-gqa2"),
    pytest.param(2, 2, 2, 65, 130, 64, "offset", id="T65-S130-D64-offset"),
    # 16-bit, cp.async staging: both double buffers in turn over 5 key tiles, unmasked tiles
    # below the diagonal, a partial last query block
    pytest.param(1, 2, 1, 200, 260, 128, "contig", id="T200-S260-D128-gqa2"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Bn,Hq,Hkv,T,S,D,layout", FWD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward(cuda_emu, dtype, Bn, Hq, Hkv, T, S, D, layout, causal):
    q, k, v = _qkv(Bn, Hq, Hkv, T, S, D, dtype, layout)
    scale = 1.0 / math.sqrt(D)
    out, lse = _fwd(cuda_emu, q, k, v, causal, scale)
    ref64 = reference.attention(*_f64(q, k, v), causal, scale)
    assert_close(out, ref64, reference.attention(q, k, v, causal, scale), dtype)
    none = _sees_no_key(T, S, causal)
    assert (out[:, :, none] == 0).all(), "a query that sees no key gives zeros"
    _check_lse(lse, q, k, v, causal, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 20, 48, 64, 80, 128, 256])
def test_forward_kernel_choice(cuda_emu, dtype, D):
    """16-bit inputs with D <= 128 take the tensor-core kernel (dynamic shared memory: two
    buffers of a 64-key K and V tile, 16-bit, rows padded to DP + 8 with DP the next of 32,
    64, 96, 128; the 64-query Q tile is staged in the second buffer); fp32 and wider heads the
    CUDA-core one (fp32 tiles: 16 queries, 32 keys)."""
    q, k, v = _qkv(1, 2, 1, 9, 9, D, dtype, "contig")
    _fwd(cuda_emu, q, k, v, True, 0.3)
    if dtype != F32 and D <= 128:
        DP = next(p for p in (32, 64, 96, 128) if D <= p)
        assert cuda_emu.last_launch() == (2, 2 * 4 * 64 * (DP + 8))
    else:
        assert cuda_emu.last_launch() == (2, 4 * (16 * D + 32 * (D + 1) + 32 * D))


def test_forward_scale_is_taken_as_given(cuda_emu):
    # Not 1/sqrt(D): a kernel that ignored `scale` (or applied it twice) fails here.
    q, k, v = _qkv(1, 2, 1, 33, 33, 48, F32, "contig")
    out, lse = _fwd(cuda_emu, q, k, v, True, 0.37)
    assert_close(out, reference.attention(*_f64(q, k, v), True, 0.37),
                 reference.attention(q, k, v, True, 0.37), F32)
    _check_lse(lse, q, k, v, True, 0.37)


@pytest.mark.parametrize("T,S", [(33, 7), (100, 33), (7, 1)])
def test_forward_rows_without_keys_match_cpu_kernel(cuda_emu, T, S):
    """Causal with T > S: the C++ CPU kernel (the other flash implementation) and the CUDA
    kernel agree on which rows get zeros and lse = +inf, and on everything else."""
    from minigpt import _backend
    try:
        ext = _backend.extension()
    except _backend.BackendUnavailableError as e:
        pytest.skip(str(e))
    q, k, v = _qkv(1, 3, 1, T, S, 64, F32, "contig")
    out, lse = _fwd(cuda_emu, q, k, v, True, 0.125)
    cpu_out, cpu_lse = ext.attention_fwd(q, k, v, True, 0.125)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(cpu_lse))
    assert torch.isposinf(lse).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, cpu_out, rtol=1e-5, atol=1e-5)
    fin = torch.isfinite(cpu_lse)
    torch.testing.assert_close(lse[fin], cpu_lse[fin], rtol=1e-5, atol=1e-5)


# ---- backward -------------------------------------------------------------------------------------
def _bwd(emu, do, q, k, v, out, lse, causal, scale):
    """attention_bwd's WITH_CUDA branch: out and lse contiguous (the forward's), dout with its own
    strides, a (B, Hq, T) fp32 delta scratch left uninitialised (here: NaN)."""
    Bn, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    assert out.is_contiguous() and lse.is_contiguous() and lse.dtype == F32
    qg, kg, vg, dog = B.guarded(q), B.guarded(k), B.guarded(v), B.guarded(do)
    outg, lseg = B.guarded(out), B.guarded(lse)
    delta = B.guarded_empty((Bn, Hq, T), F32)
    dq = B.guarded_empty((Bn, Hq, T, D), q.dtype)
    dk = B.guarded_empty((Bn, Hkv, S, D), q.dtype)
    dv = B.guarded_empty((Bn, Hkv, S, D), q.dtype)
    emu.call("minigpt_attention_bwd_cuda", _geo(qg, kg, vg, causal), dog, *dog.stride()[:3],
             qg, kg, vg, outg, lseg, delta, dq, dk, dv, scale, B.DTYPE_CODES[q.dtype], None)
    B.check_guards(delta, dq, dk, dv)
    return delta, dq, dk, dv


def _ref_grads(q, k, v, do, causal, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = reference.attention(*leaves, causal, scale)
    return out.detach(), torch.autograd.grad(out, leaves, do)


BWD_SHAPES = [
    pytest.param(2, 3, 1, 33, 100, 48, "bthd", True, id="T33-S100-D48-gqa3-causal"),
    pytest.param(1, 4, 1, 100, 33, 80, "packed", True, id="T100-S33-D80-gqa4-causal"),
    pytest.param(2, 2, 2, 100, 100, 64, "contig", False, id="T100-S100-D64-full"),
    pytest.param(1, 2, 2, 100, 100, 64, "mixed", True, id="T100-S100-D64-causal"),
    pytest.param(2, 6, 2, 7, 33, 128, "padded", False, id="T7-S33-D128-gqa3-full"),
    pytest.param(1, 4, 1, 33, 7, 16, "mixed", False, id="T33-S7-D16-gqa4-full"),
    pytest.param(1, 2, 1, 1, 100, 64, "bthd", True, id="T1-S100-gqa2-causal"),
    pytest.param(1, 1, 1, 100, 1, 48, "contig", True, id="T100-S1-causal"),
    pytest.param(1, 1, 1, 1, 1, 16, "contig", False, id="T1-S1"),
    pytest.param(1, 3, 1, 33, 40, 256, "packed", True, id="T33-S40-D256-gqa3-causal"),
    pytest.param(1, 1, 1, 7, 7, 256, "mixed", False, id="T7-S7-D256-full"),
    # 16-bit: the tensor-core kernels' element-wise staging, over several query and key tiles
    pytest.param(1, 4, 2, 70, 130, 20, "padded", True, id="T70-S130-D20-gqa2-causal"),
    pytest.param(2, 2, 2, 65, 65, 96, "offset", False, id="T65-S65-D96-offset-full"),
    # 16-bit, cp.async staging: the dK/dV walk crosses from one query head of the group to the
    # next (32-query tiles at D 128), the dQ walk over 4 key tiles
    pytest.param(1, 4, 2, 200, 200, 128, "contig", True, id="T200-S200-D128-gqa2-causal"),
    pytest.param(1, 2, 1, 130, 150, 64, "contig", False, id="T130-S150-D64-gqa2-full"),
]


def _backward_case(emu, dtype, Bn, Hq, Hkv, T, S, D, layout, causal, do_layout):
    q, k, v = _qkv(Bn, Hq, Hkv, T, S, D, dtype, layout)
    do = _heads(Bn, Hq, T, D, dtype, do_layout)
    scale = 1.0 / math.sqrt(D)
    # out and lse as the forward saves them: out in the input dtype, lse in fp32.
    out, lowp = _ref_grads(q, k, v, do, causal, scale)
    _, lse32 = _lse_ref(q, k, v, causal, scale)
    _, truth = _ref_grads(*_f64(q, k, v, do), causal, scale)
    delta, *grads = _bwd(emu, do, q, k, v, out.contiguous(), lse32.float().contiguous(), causal,
                         scale)
    for name, g, g64, gl in zip(("dq", "dk", "dv"), grads, truth, lowp):
        assert_close(g, g64, gl, dtype, name=name)
    # delta = rowsum(dO * O) over the saved out, in fp32.
    want = (do.double() * out.double()).sum(-1)
    torch.testing.assert_close(delta.double(), want, rtol=1e-5, atol=1e-5 * D)


@pytest.mark.parametrize("Bn,Hq,Hkv,T,S,D,layout,causal", BWD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward(cuda_emu, dtype, Bn, Hq, Hkv, T, S, D, layout, causal):
    # dout strided unlike q where q is strided (the strides are passed separately).
    _backward_case(cuda_emu, dtype, Bn, Hq, Hkv, T, S, D, layout, causal,
                   "contig" if layout == "bthd" else "bthd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 48, 80, 128, 256])
def test_backward_kernel_choice(cuda_emu, dtype, D):
    """The backward's last launch is its dK/dV kernel: the tensor-core one for 16-bit inputs
    with D <= 128 (64-key block; K, V and two buffers of a query tile of 64 rows, 32 past D 64:
    Q and dO in 16 bits with rows of DP + 8, and the tile's lse and delta), else the CUDA-core
    one (32 keys, fp32)."""
    q, k, v = _qkv(1, 2, 1, 9, 9, D, dtype, "contig")
    do = torch.randn_like(q)
    out, _ = _ref_grads(q, k, v, do, True, 0.3)
    _, lse32 = _lse_ref(q, k, v, True, 0.3)
    _bwd(cuda_emu, do, q, k, v, out.contiguous(), lse32.float().contiguous(), True, 0.3)
    if dtype != F32 and D <= 128:
        DP = next(p for p in (32, 64, 96, 128) if D <= p)
        BQ = 64 if DP <= 64 else 32
        assert cuda_emu.last_launch() == (1, 2 * (2 * 64 + 4 * BQ) * (DP + 8) + 4 * 4 * BQ)
    else:
        assert cuda_emu.last_launch() == (1, 4 * (2 * 32 * D + 2 * 32 * (D + 1) + 64))


def test_forward_then_backward_chain(cuda_emu):
    """The op's real chain: the backward reads the emulated forward's own out and lse, including
    rows that saw no key (lse = +inf -> their dq is 0 and they add nothing to dk, dv)."""
    T, S, D, scale = 40, 9, 32, 0.2
    q, k, v = _qkv(1, 2, 1, T, S, D, F32, "bthd")
    do = torch.randn(1, 2, T, D)
    out, lse = _fwd(cuda_emu, q, k, v, True, scale)
    _, dq, dk, dv = _bwd(cuda_emu, do, q, k, v, out.clone(), lse.clone(), True, scale)
    _, lowp = _ref_grads(q, k, v, do, True, scale)
    _, truth = _ref_grads(*_f64(q, k, v, do), True, scale)
    for name, g, g64, gl in zip(("dq", "dk", "dv"), (dq, dk, dv), truth, lowp):
        assert_close(g, g64, gl, F32, name=name)
    assert (dq[:, :, _sees_no_key(T, S, True)] == 0).all()


# ---- decode (flash-decoding) ----------------------------------------------------------------------
def _rule_nsplit(Bn, Hkv, S, sms=H100_SMS):
    """decode_attention_fwd's choice: enough splits for 8 blocks an SM, each at least 256 keys;
    split_len = ceil(S / nsplit)."""
    want = max(1, (8 * sms + Bn * Hkv - 1) // (Bn * Hkv))
    nsplit = max(1, min(want, (S + 255) // 256))
    return nsplit, (S + nsplit - 1) // nsplit


def _decode(emu, q, kc, vc, seqlens, nsplit, split_len, scale):
    Bn, Hq, _, D = q.shape
    qg, kg, vg = B.guarded(q), B.guarded(kc), B.guarded(vc)
    lens = B.guarded(seqlens.to(torch.int32).contiguous())
    o_part = B.guarded_empty((Bn, Hq, nsplit, D), F32)
    lse_part = B.guarded_empty((Bn, Hq, nsplit), F32)
    out = B.guarded_empty((Bn, Hq, 1, D), q.dtype)
    emu.call("minigpt_decode_attention_cuda", _geo(qg, kg, vg, False), qg, kg, vg, lens, o_part,
             lse_part, out, nsplit, split_len, scale, B.DTYPE_CODES[q.dtype], None)
    B.check_guards(o_part, lse_part, out)
    return out, lse_part


def _decode_inputs(Bn, Hq, Hkv, S, D, dtype, layout):
    q = _heads(Bn, Hq, 1, D, dtype, "bthd" if layout != "contig" else "contig")
    kc = _heads(Bn, Hkv, S, D, dtype, layout, 0)
    vc = _heads(Bn, Hkv, S, D, dtype, layout, 1)
    return q, kc, vc


def _decode_check(out, lse_part, q, kc, vc, lens, nsplit, split_len, scale, dtype):
    ref64 = reference.decode_attention(*_f64(q, kc, vc), lens, scale)
    assert_close(out, ref64, reference.decode_attention(q, kc, vc, lens, scale), dtype)
    # A split that holds no key of its sequence has lse_part = -inf (weight 0 in the combine);
    # the others are finite.
    L = lens.clamp(max=kc.shape[2]).to(torch.int64)
    empty = (torch.arange(nsplit)[None, :] * split_len) >= L[:, None]  # (B, nsplit)
    assert torch.equal(torch.isneginf(lse_part), empty[:, None, :].expand_as(lse_part))


# (B, Hq, Hkv, S_max, D, layout, cache_seqlens): lengths vary per sequence, one leaves later
# splits empty, one is the whole cache.
DECODE_CASES = [
    pytest.param(2, 3, 1, 600, 64, "bthd", [600, 150], id="S600-D64-gqa3"),
    pytest.param(3, 8, 2, 100, 80, "packed", [100, 1, 33], id="S100-D80-gqa4"),
    pytest.param(2, 2, 2, 33, 48, "padded", [7, 33], id="S33-D48-mha"),
    pytest.param(2, 6, 2, 100, 64, "mixed", [64, 100], id="S100-D64-gqa3-mixed"),
    pytest.param(2, 3, 1, 7, 256, "contig", [7, 5], id="S7-D256-gqa3"),
    pytest.param(1, 4, 1, 1, 16, "bthd", [1], id="S1-D16-gqa4"),
    pytest.param(2, 2, 1, 300, 128, "bthd", [300, 257], id="S300-D128"),
    # 12 query heads on one kv head: two chunks of the group (8 + 4) in the coalesced kernel
    pytest.param(2, 12, 1, 130, 32, "contig", [130, 70], id="S130-D32-mqa12"),
    # rows off 16-byte boundaries: the lane-per-key kernel
    pytest.param(1, 4, 2, 50, 64, "offset", [50], id="S50-D64-gqa2-offset"),
]


def _nsplits(S):
    """Explicit split counts (1; a few that do not divide S, so the last split is short; one key
    per split) and the rule's for an H100."""
    return sorted({1, 2, 3, 7, S} & set(range(1, S + 1)))


@pytest.mark.parametrize("Bn,Hq,Hkv,S,D,layout,lens", DECODE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(cuda_emu, dtype, Bn, Hq, Hkv, S, D, layout, lens):
    q, kc, vc = _decode_inputs(Bn, Hq, Hkv, S, D, dtype, layout)
    lens = torch.tensor(lens, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)
    splits = [(n, (S + n - 1) // n) for n in _nsplits(S)] + [_rule_nsplit(Bn, Hkv, S)]
    for nsplit, split_len in splits:
        out, lse_part = _decode(cuda_emu, q, kc, vc, lens, nsplit, split_len, scale)
        _decode_check(out, lse_part, q, kc, vc, lens, nsplit, split_len, scale, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv,D,layout", [(4, 2, 64, "contig"), (12, 1, 128, "bthd"),
                                             (3, 3, 48, "padded"), (4, 1, 256, "contig"),
                                             (4, 2, 64, "offset")], ids=str)
def test_decode_kernel_choice(cuda_emu, dtype, Hq, Hkv, D, layout):
    """Rows of whole 16-byte packs take the coalesced split kernel: a block of 4 warps per
    (batch, kv head, split, chunk of up to 8 of the group's query heads), shared memory for
    every key slot's (m, l, output) per head; else the lane-per-key kernel (a warp per query
    head and split). Then the combine, a warp per query head."""
    Bn, S, nsplit = 2, 40, 3
    q, kc, vc = _decode_inputs(Bn, Hq, Hkv, S, D, dtype, layout)
    _decode(cuda_emu, q, kc, vc, torch.tensor([40, 17], dtype=torch.int32), nsplit, 14, 0.2)
    pack = 16 // q.element_size()
    lpk = 1
    while lpk * pack < D:
        lpk *= 2
    rep = Hq // Hkv
    REP = next(r for r in (1, 2, 4, 8) if r >= min(rep, 8))
    vec = layout != "offset" and lpk <= 32
    split = ((Bn * Hkv, nsplit, -(-rep // REP), 128, 4 * 4 * (32 // lpk) * REP * (D + 2)) if vec
             else (Bn * Hq, nsplit, 1, 32, 4 * D))
    assert cuda_emu.launches() == [split, (Bn * Hq, 1, 1, 32, 0)]


def test_decode_cases_reach_several_splits_by_the_rule():
    """Guards the cases above: on an H100 the rule gives several splits for some of them, and a
    length that leaves splits empty, not only the single split every S <= 256 gets."""
    rules = {}
    for case in DECODE_CASES:
        Bn, _, Hkv, S, _, _, lens = case.values
        rules[case.id] = (_rule_nsplit(Bn, Hkv, S), lens)
    assert rules["S600-D64-gqa3"] == ((3, 200), [600, 150])  # splits 1 and 2 of seq 1 empty
    assert rules["S300-D128"][0] == (2, 150)
    assert _rule_nsplit(264, 4, 4096) == (1, 4096)  # B * Hkv alone: 8 blocks an SM
    assert _rule_nsplit(4, 8, 65536) == (33, 1986)  # the decode bench's 64k cache


def test_decode_lengths_past_cache_and_zero(cuda_emu):
    """The kernel clamps lengths to S_max (a captured graph skips the range check) and gives
    zeros for a length of 0, as the C++ CPU kernel does (the reference would give NaN there)."""
    S, D, scale = 70, 32, 0.3
    q, kc, vc = _decode_inputs(3, 2, 1, S, D, F32, "contig")
    lens = torch.tensor([500, 0, 40], dtype=torch.int32)
    out, _ = _decode(cuda_emu, q, kc, vc, lens, 3, 24, scale)
    assert (out[1] == 0).all()
    keep = torch.tensor([0, 2])
    clamped = lens.clamp(0, S)[keep]
    sub = [t[keep] for t in (q, kc, vc)]
    assert_close(out[keep], reference.decode_attention(*_f64(*sub), clamped, scale),
                 reference.decode_attention(*sub, clamped, scale), F32)


def test_decode_matches_forward_with_one_query(cuda_emu):
    """Decode with every length = S is the forward with T = 1 (causal or not, the same)."""
    q, kc, vc = _decode_inputs(2, 4, 2, 100, 64, F32, "bthd")
    lens = torch.tensor([100, 100], dtype=torch.int32)
    out_d, _ = _decode(cuda_emu, q, kc, vc, lens, 4, 25, 0.125)
    out_f, _ = _fwd(cuda_emu, q, kc, vc, True, 0.125)
    torch.testing.assert_close(out_d, out_f, rtol=1e-5, atol=1e-6)


# ---- bad geometry: an error code, nothing launched -------------------------------------------------
BAD_GEO = [
    pytest.param(dict(Hq=3, Hkv=2), id="Hq-not-multiple-of-Hkv"),
    pytest.param(dict(Hkv=0), id="Hkv-0"),
    pytest.param(dict(D=0), id="D0"),
    pytest.param(dict(D=257), id="D257"),
]


@pytest.mark.parametrize("override", BAD_GEO)
@pytest.mark.parametrize("entry", ["fwd", "bwd", "decode"])
def test_bad_geometry_is_refused(cuda_emu, entry, override):
    # Buffers large enough for the geometry as given (D = 257 included), so a kernel that ran
    # anyway would write them: they must stay NaN.
    Bn, Hq, Hkv, T, S, D = 1, 4, 2, 7, 9, 16
    big = 2 * 4 * 9 * 257
    q, k, v = (B.guarded(torch.randn(big)) for _ in range(3))
    g = B.MgAttnGeo()
    g.B, g.Hq, g.Hkv, g.T, g.S, g.D = Bn, Hq, Hkv, T if entry != "decode" else 1, S, D
    g.qb, g.qh, g.qt = Hq * T * 257, T * 257, 257
    g.kb, g.kh, g.ks = Hkv * S * 257, S * 257, 257
    g.vb, g.vh, g.vs = g.kb, g.kh, g.ks
    g.causal = 1
    for name, val in override.items():
        setattr(g, name, val)
    outs = [B.guarded_empty((big,), F32) for _ in range(5)]
    if entry == "fwd":
        args = ("minigpt_attention_fwd_cuda", g, q, k, v, outs[0], outs[1], 0.25, 0, None)
    elif entry == "bwd":
        args = ("minigpt_attention_bwd_cuda", g, q, 257 * T * Hq, 257 * T, 257, q, k, v,
                B.guarded(torch.randn(big)), B.guarded(torch.randn(big)), outs[1], outs[2],
                outs[3], outs[4], 0.25, 0, None)
    else:
        lens = B.guarded(torch.full((Bn,), S, dtype=torch.int32))
        args = ("minigpt_decode_attention_cuda", g, q, k, v, lens, outs[1], outs[2], outs[0], 2,
                5, 0.25, 0, None)
    with pytest.raises(RuntimeError, match="CUDA error 1"):
        cuda_emu.call(*args)
    for o in outs:
        assert torch.isnan(o).all(), "a refused call wrote an output"
    B.check_guards(*outs)


@pytest.mark.parametrize("nsplit,split_len", [(0, 4), (2, 0), (-1, 8)])
def test_decode_bad_split_is_refused(cuda_emu, nsplit, split_len):
    q, kc, vc = _decode_inputs(1, 2, 1, 8, 16, F32, "contig")
    out = B.guarded_empty((1, 2, 1, 16), F32)
    parts = B.guarded_empty((64,), F32)
    with pytest.raises(RuntimeError, match="CUDA error 1"):
        cuda_emu.call("minigpt_decode_attention_cuda", _geo(q, kc, vc, False), q, kc, vc,
                      torch.tensor([8], dtype=torch.int32), parts, parts, out, nsplit, split_len,
                      0.25, 0, None)
    assert torch.isnan(out).all() and torch.isnan(parts).all()


@pytest.mark.parametrize("entry", ["fwd", "decode"])
def test_unknown_dtype_code_is_refused(cuda_emu, entry):
    q, k, v = _qkv(1, 2, 1, 1, 8, 16, F32, "contig")
    out = B.guarded_empty((1, 2, 1, 16), F32)
    with pytest.raises(RuntimeError, match="CUDA error 1"):
        if entry == "fwd":
            cuda_emu.call("minigpt_attention_fwd_cuda", _geo(q, k, v, True), q, k, v, out,
                          torch.empty(2), 0.25, 3, None)
        else:
            cuda_emu.call("minigpt_decode_attention_cuda", _geo(q, k, v, False), q, k, v,
                          torch.tensor([8], dtype=torch.int32), torch.empty(32), torch.empty(2),
                          out, 1, 8, 0.25, 3, None)
    assert torch.isnan(out).all()
