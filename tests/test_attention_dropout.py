"""ops.attention(dropout_p > 0): dropout on the attention probabilities.

The Triton kernels draw the mask with tl.rand (Philox) from a seed and never store it; the C++
CPU kernel draws it with the same function (csrc/philox.h) and the reference on the host
(minigpt/reference/philox.py), so the kernels are compared with the reference for the same seed
exactly as without dropout (FlashAttention's tolerance rule, tests/_tol.py): forward and all
three gradients, MHA/GQA, causal or not, T != S, rows that see no key, non-contiguous inputs.
Plus: the host Philox against tl.rand bit for bit, the C++ kernel's mask against the reference
element for element, keep-rate statistics, seeding, dropout_p=0 being the old call, bad
arguments, float64 gradcheck, torch.compile, and the model's train/eval behaviour.

In the Triton interpreter the kernels' dots run in fp32 (its bf16 tl.dot is wrong), so
bf16/fp16 are tested only where a GPU compiles the kernels.
"""
import math
import os
import shutil
import subprocess

import pytest
import torch

from minigpt import _backend, ops, reference
from minigpt._backend import BackendUnavailableError
from minigpt.kernels import attention as kern
from minigpt.model import GPT, GPTConfig
from minigpt.reference.philox import dropout_keep, philox_uniform
from minigpt.reference.softmax import causal_mask
from tests._tol import assert_close, f64
from tests.conftest import skip_if_triton_refused

# Where Triton runs: the GPU if there is one, else the interpreter on CPU tensors.
TDEV = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton kernels run under the test only where the dispatch accepts this Triton.
TRITON = pytest.param("triton", marks=skip_if_triton_refused)
LOWP = [torch.bfloat16, torch.float16] if torch.cuda.is_available() else []
SEED = 2**40 + 12345  # above 2**32: both halves of the Philox key matter

# (B, Hq, Hkv, T, S, D, causal). Interpreter-friendly sizes.
CASES = {
    "mha-7-d16": (1, 2, 2, 7, 7, 16, True),
    "gqa3-33x40-d48": (1, 3, 1, 33, 40, 48, True),
    "T1-S33-d64": (1, 2, 1, 1, 33, 64, True),
    "causal-T>S-33x7-d16": (1, 2, 2, 33, 7, 16, True),  # the first 26 queries see no key
    "full-gqa2-33x7-d48": (2, 4, 2, 33, 7, 48, False),
    "full-7x33-d64": (1, 2, 2, 7, 33, 64, False),
}


def _eager(q, k, v, causal, scale, p, seed):
    """Dropout attention as eager PyTorch computes it in q's own dtype, with the kernels' mask:
    the yardstick of the tolerance rule."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, 1)
    v = v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    T, S = q.shape[2], k.shape[2]
    if causal:
        keep = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
        s = s.masked_fill(~keep.to(q.device), float("-inf"))
    a = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    a = torch.where(dropout_keep(seed, p, a.shape, a.device), a, 0.0) / (1 - p)
    return a @ v


def _inputs(shape, dtype, dev, transposed):
    if transposed:  # (B, T, H, D) viewed as (B, H, T, D), as a model's projections give them
        B, H, T, D = shape
        base = torch.randn(B, T, H, D, device=dev).to(dtype).requires_grad_()
        return base, base.transpose(1, 2)
    t = torch.randn(*shape, device=dev).to(dtype).requires_grad_()
    return t, t


def _launchers(be):
    """(device, forward, backward) of the Triton or C++ kernels, called with an explicit seed."""
    if be == "triton":
        return TDEV, kern.attention_fwd, kern.attention_bwd
    ext = _backend.extension()
    return "cpu", ext.attention_fwd, ext.attention_bwd


def _check_kernel(case, p, dtype, transposed=False, seed=SEED, be="triton"):
    """The Triton or C++ kernels with an explicit seed against the reference with that seed."""
    B, Hq, Hkv, T, S, D, causal = case
    dev, fwd, bwd = _launchers(be)
    (ql, q), (kl, k), (vl, v) = (_inputs(s, dtype, dev, transposed) for s in
                                 ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    scale = 1.0 / math.sqrt(D)
    qc, kc, vc = (t.detach() if t.stride(-1) == 1 else t.detach().contiguous()
                  for t in (q, k, v))
    if transposed:
        assert not qc.is_contiguous()  # the kernels read the strided views
    out, lse = fwd(qc, kc, vc, causal, scale, dropout_p=p, seed=seed)
    q64, k64, v64 = f64(q), f64(k), f64(v)
    out64 = reference.attention(q64, k64, v64, causal, scale, dropout_p=p, seed=seed)
    out_lp = _eager(q, k, v, causal, scale, p, seed)
    assert_close(out, out64, out_lp, dtype, "out")
    # lse is the undropped softmax's.
    s64 = q64.detach() @ k64.detach().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * scale
    if causal:
        s64 = s64.masked_fill(~causal_mask(T, S, dev), float("-inf"))
    ref_lse = torch.logsumexp(s64, -1)
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[seen].double(), ref_lse[seen], rtol=1e-4, atol=1e-4)

    assert torch.isinf(lse[~seen]).all() and (out[~seen] == 0).all()
    g = torch.randn(B, Hq, T, D, device=dev, dtype=torch.float64)
    do = g.to(dtype)
    dq, dk, dv = bwd(do, qc, kc, vc, out, lse, causal, scale, dropout_p=p, seed=seed)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), g)
    grads_lp = torch.autograd.grad(out_lp, (q, k, v), do)
    for name, a, a_lp, a64 in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_lp, grads64):
        assert_close(a, a64, a_lp, dtype, name)


# ---- the host Philox is tl.rand -----------------------------------------------------------

@skip_if_triton_refused
def test_philox_matches_tl_rand():
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(OFF, OUT, seed, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        off = tl.load(OFF + i, mask=i < N, other=0)
        tl.store(OUT + i, tl.rand(seed, off), mask=i < N)

    offsets = torch.cat([torch.arange(300), torch.randint(0, 2**62, (300,)),
                         torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1,
                                       3 * 2**40 + 5, 2**63 - 1])]).to(TDEV)
    for seed in (0, 1, 2**31 - 1, 2**31, 2**32 + 7, SEED, 2**63 - 1):
        got = torch.empty(offsets.shape, dtype=torch.float32, device=TDEV)
        rand_kernel[(triton.cdiv(offsets.numel(), 128),)](offsets, got, seed, offsets.numel(),
                                                          BLOCK=128)
        want = philox_uniform(seed, offsets)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), seed
        # A seed given as an int64 tensor (how ops.attention passes it) is the same.
        assert torch.equal(philox_uniform(torch.tensor(seed), offsets), want)
    assert 0.0 <= want.min() and want.max() < 1.0


def test_keep_rate_statistics():
    shape = (2, 4, 128, 256)  # 262144 draws
    n = math.prod(shape)
    for p in (0.1, 0.5, 0.9):
        keep = dropout_keep(SEED, p, shape)
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma, p
        # Every (batch, head) slice too: the offsets cover all of them, not one reused range.
        per = keep.float().mean((-1, -2))
        assert ((per - (1 - p)).abs() < 5 * math.sqrt(p * (1 - p) / (128 * 256))).all(), p
    a, b = dropout_keep(1, 0.5, shape), dropout_keep(2, 0.5, shape)
    # Two seeds agree on about half the draws (independent masks), not all.
    assert abs((a == b).float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)


def test_reference_dropout_needs_a_seed():
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="seed"):
        reference.attention(q, q, q, True, None, dropout_p=0.1)


# ---- the kernels against the reference ------------------------------------------------------

@skip_if_triton_refused
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_dropout_kernels_fp32(case, p):
    _check_kernel(CASES[case], p, torch.float32)


@skip_if_triton_refused
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32] + LOWP, ids=str)
def test_dropout_kernels_noncontiguous(dtype, p):
    _check_kernel((2, 4, 2, 33, 20, 48, True), p, dtype, transposed=True)


@skip_if_triton_refused
@pytest.mark.skipif(not LOWP, reason="bf16/fp16 tl.dot is wrong in the Triton interpreter")
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", ["gqa3-33x40-d48", "full-gqa2-33x7-d48"], ids=str)
def test_dropout_kernels_low_precision(case, dtype):
    _check_kernel(CASES[case], 0.2, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="many tiles: too slow interpreted")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(1, 4, 2, 300, 300, 64, True), (2, 2, 1, 130, 257, 128, True),
                                  (1, 2, 2, 200, 100, 256, False)], ids=str)
@skip_if_triton_refused
def test_dropout_kernels_many_tiles(case, dtype):
    # The GPU tiles (64-128 rows, the dropout tables of kernels/attention.py) with ragged ends:
    # the mask must not depend on where a tile starts.
    _check_kernel(case, 0.1, dtype)


# ---- csrc/philox.h against the reference ------------------------------------------------------

_PHILOX_MAIN = r"""
#include "philox.h"
#include <cstdio>
#include <cstdint>
#include <cstring>
// stdin: lines "seed base step n"; stdout: per line, philox_uniforms' and philox_uniform's
// bits as hex words.
int main() {
  unsigned long long seed, base, step;
  long long n;
  float u[300];
  while (std::scanf("%llu %llu %llu %lld", &seed, &base, &step, &n) == 4) {
    minigpt::philox_uniforms(seed, base, step, n, u);
    for (long long t = 0; t < n; ++t) {
      float one = minigpt::philox_uniform(seed, base + t * step);
      uint32_t a, b;
      std::memcpy(&a, &u[t], 4);
      std::memcpy(&b, &one, 4);
      std::printf("%08x %08x\n", a, b);
    }
  }
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("flags", [["-march=native"], ["-mno-avx512f"]],
                         ids=["native", "no-avx512"])
def test_csrc_philox_is_tl_rand(tmp_path, flags):
    # The C++ kernel's draws bit for bit against the reference (itself checked against
    # tl.rand), both the block function (AVX-512 where the CPU has it, else the plain loop) and
    # the one-draw function, with offsets past 2**32 (the counter's high word) that no
    # attention test here is big enough to reach.
    src = tmp_path / "philox_main.cpp"
    src.write_text(_PHILOX_MAIN)
    exe = tmp_path / "philox_main"
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    subprocess.run(["g++", "-O2", "-fopenmp-simd", *flags, "-I", csrc, str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    gen = torch.Generator().manual_seed(0)
    rows = [(SEED, 0, 1, 300), (0, 2**32 - 70, 1, 150), (2**63 - 1, 2**40 + 3, 2**31 + 7, 77),
            (1, 5, 300, 64), (2**32 + 7, 2**62, 1, 1), (SEED, 123, 1, 0)]
    for _ in range(6):
        rows.append((int(torch.randint(0, 2**63 - 1, (), generator=gen)),
                     int(torch.randint(0, 2**62, (), generator=gen)),
                     int(torch.randint(1, 2**20, (), generator=gen)),
                     int(torch.randint(1, 200, (), generator=gen))))
    stdin = "".join(f"{s} {b} {st} {n}\n" for s, b, st, n in rows)
    out = subprocess.run([str(exe)], input=stdin, check=True, capture_output=True,
                         text=True).stdout.split()
    got = torch.tensor([int(w, 16) for w in out], dtype=torch.int64).view(-1, 2)
    want = torch.cat([philox_uniform(s, b + st * torch.arange(n, dtype=torch.int64))
                      for s, b, st, n in rows])
    want = want.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert got.shape[0] == want.numel() == sum(r[3] for r in rows)
    assert torch.equal(got[:, 0], want) and torch.equal(got[:, 1], want)


# ---- the C++ cpu kernel against the reference -----------------------------------------------

HAS_EXT = _backend.is_available("cpu", "cpu")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="minigpt._C is not built")

# (B, Hq, Hkv, T, S, D, causal). The C++ kernel's tiles are 64 queries x 64 keys: T and S up to
# 300 give several key tiles and ragged last tiles of both.
CPU_CASES = {
    "mha-7-d16": (1, 2, 2, 7, 7, 16, True),
    "T1-S300-d64": (1, 2, 1, 1, 300, 64, True),
    "gqa3-33x130-d48": (2, 3, 1, 33, 130, 48, True),
    "mqa4-100x300-d80": (1, 4, 1, 100, 300, 80, True),
    "causal-T>S-100x33-d64": (1, 4, 2, 100, 33, 64, True),  # the first 67 queries see no key
    "full-gqa2-100x70-d16": (2, 4, 2, 100, 70, 16, False),
    "full-33x300-d80": (1, 2, 2, 33, 300, 80, False),
}


@pytest.fixture(params=[1, 64], ids=["one-pass", "two-pass"])
def cpu_threads(request):
    """The C++ forward and backward take one task per (batch, kv head) when there are at least
    as many pairs as threads (the backward then in one pass, dQ included), else finer tasks (the
    backward in two passes, dK/dV then dQ): one thread gives the former for every case here, 64
    the latter."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@needs_ext
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("case", list(CPU_CASES), ids=str)
def test_dropout_cpu_kernel(case, p, cpu_threads):
    _check_kernel(CPU_CASES[case], p, torch.float32, be="cpu")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["gqa3-33x130-d48", "mqa4-100x300-d80",
                                  "causal-T>S-100x33-d64", "full-gqa2-100x70-d16"], ids=str)
def test_dropout_cpu_kernel_other_dtypes(case, dtype, cpu_threads):
    _check_kernel(CPU_CASES[case], 0.2, dtype, be="cpu")


@needs_ext
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dropout_cpu_kernel_noncontiguous(dtype, p, cpu_threads):
    _check_kernel((2, 4, 2, 100, 130, 48, True), p, dtype, transposed=True, be="cpu")


@needs_ext
@pytest.mark.parametrize("causal", [True, False])
def test_dropout_cpu_kernel_mask_is_the_reference_mask(causal, cpu_threads):
    # q = 0 makes every seen key equally likely and v = I (S = D) puts probability (i, j) in
    # out[i, j]: the output is the kept mask itself, compared element for element over
    # several query and key tiles and (batch, head) pairs, with a seed above 2**32 (both key
    # words matter). Offsets past 2**32 (the counter's high word) would take 2**32
    # probabilities: the reference's Philox is checked there against tl.rand instead.
    B, Hq, Hkv, T, S = 2, 6, 2, 130, 200
    q = torch.zeros(B, Hq, T, S)
    v = torch.eye(S).expand(B, Hkv, S, S).contiguous()
    k = torch.randn(B, Hkv, S, S)
    p = 0.3
    out, _ = _backend.extension().attention_fwd(q, k, v, causal, 1.0, dropout_p=p, seed=SEED)
    keep = dropout_keep(SEED, p, (B, Hq, T, S))
    seen = causal_mask(T, S, "cpu") if causal else torch.ones(T, S, dtype=torch.bool)
    assert torch.equal(out != 0, keep & seen)
    n = seen.sum(-1, keepdim=True)
    torch.testing.assert_close(out, (keep & seen) / (n * (1 - p)), rtol=1e-6, atol=0)


@needs_ext
def test_dropout_cpu_kernel_gradcheck():
    # float64, a fixed seed: the mask is fixed, so the op is a differentiable function of q, k, v.
    def f(q, k, v):
        with torch.random.fork_rng():
            torch.manual_seed(11)
            return ops.attention(q, k, v, causal=causal, dropout_p=0.4, backend="cpu")

    for causal, (T, S) in ((True, (5, 7)), (False, (6, 4)), (True, (6, 3))):
        q = torch.randn(1, 4, T, 8, dtype=torch.float64, requires_grad=True)
        k = torch.randn(1, 2, S, 8, dtype=torch.float64, requires_grad=True)
        v = torch.randn(1, 2, S, 8, dtype=torch.float64, requires_grad=True)
        assert not torch.equal(f(q, k, v), ops.attention(q, k, v, causal=causal, backend="cpu"))
        assert torch.autograd.gradcheck(f, (q, k, v))


@needs_ext
@pytest.mark.parametrize("causal", [True, False])
def test_dropout_cpu_kernel_zero_p_is_the_old_kernel(causal):
    # dropout_p = 0 (the binding's default) runs the kernels' code without dropout, whatever
    # the seed.
    ext = _backend.extension()
    q, k, v = torch.randn(2, 4, 70, 48), torch.randn(2, 2, 90, 48), torch.randn(2, 2, 90, 48)
    out, lse = ext.attention_fwd(q, k, v, causal, 0.2)
    out0, lse0 = ext.attention_fwd(q, k, v, causal, 0.2, dropout_p=0.0, seed=SEED)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    do = torch.randn_like(out)
    grads = ext.attention_bwd(do, q, k, v, out, lse, causal, 0.2)
    grads0 = ext.attention_bwd(do, q, k, v, out, lse, causal, 0.2, dropout_p=0.0, seed=SEED)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads0))
    # Dropout on: the same lse (the undropped softmax's), another output.
    outd, lsed = ext.attention_fwd(q, k, v, causal, 0.2, dropout_p=0.2, seed=SEED)
    assert torch.equal(lse, lsed) and not torch.equal(out, outd)


@needs_ext
def test_dropout_cpu_kernel_bad_arguments():
    ext = _backend.extension()
    q = torch.randn(1, 1, 3, 8)
    for p in (-0.1, 1.0):
        with pytest.raises(RuntimeError, match="dropout_p"):
            ext.attention_fwd(q, q, q, True, 1.0, dropout_p=p, seed=1)
    with pytest.raises(RuntimeError, match="seed"):
        ext.attention_fwd(q, q, q, True, 1.0, dropout_p=0.5, seed=-1)


# ---- the public op --------------------------------------------------------------------------

def _qkv(dev=TDEV, requires_grad=True, dtype=torch.float32):
    q = torch.randn(2, 4, 9, 16, device=dev, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(2, 2, 11, 16, device=dev, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(2, 2, 11, 16, device=dev, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def _dev(be):
    return TDEV if be == "triton" else "cpu"


def _run(be, seed, q, k, v, p=0.3, causal=True):
    torch.manual_seed(seed)
    out = ops.attention(q, k, v, causal=causal, dropout_p=p, backend=be)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return out, grads


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("be", [TRITON, pytest.param("cpu", marks=needs_ext)])
def test_kernel_equals_torch_backend_for_the_same_manual_seed(be, causal):
    # ops.attention draws the seed from torch's default CPU generator: the same manual_seed
    # gives the triton/cpu and torch backends the same mask.
    q, k, v = _qkv(_dev(be))
    out, grads = _run(be, 7, q, k, v, causal=causal)
    ref, rgrads = _run("torch", 7, q, k, v, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    nodrop = ops.attention(q, k, v, causal=causal, backend="torch")
    assert (out - nodrop).abs().max() > 1e-2  # the dropout did something


@pytest.mark.parametrize("be", [TRITON, pytest.param("cpu", marks=needs_ext), "torch"])
def test_same_seed_same_output_other_seed_other_output(be):
    q, k, v = _qkv(_dev(be))
    a, ga = _run(be, 1, q, k, v)
    b, gb = _run(be, 1, q, k, v)
    c, gc = _run(be, 2, q, k, v)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert not torch.equal(a, c) and not torch.equal(ga[0], gc[0])
    # Successive calls draw new seeds.
    torch.manual_seed(1)
    with torch.no_grad():
        first = ops.attention(q, k, v, dropout_p=0.3, backend=be)
        second = ops.attention(q, k, v, dropout_p=0.3, backend=be)
    assert torch.equal(first, a) and not torch.equal(first, second)


@pytest.mark.parametrize("be", [TRITON, "torch", "cpu"])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_dropout_zero_is_the_plain_call(be, requires_grad):
    q, k, v = _qkv("cpu" if be == "cpu" else TDEV, requires_grad)
    state = torch.get_rng_state()
    out = ops.attention(q, k, v, dropout_p=0.0, backend=be)
    assert torch.equal(torch.get_rng_state(), state)  # no seed drawn: no cost, no RNG use
    plain = ops.attention(q, k, v, backend=be)
    assert torch.equal(out, plain)
    if requires_grad:
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g),
                        torch.autograd.grad(plain, (q, k, v), g)):
            assert torch.equal(a, b)


def test_backend_none_picks_a_dropout_backend():
    # CPU tensors: the default is the C++ kernel, with dropout (the torch reference when the
    # extension is not built); both give what backend="torch" gives for the same seed.
    q, k, v = _qkv("cpu")
    out, grads = _run(None, 3, q, k, v)
    ref, rgrads = _run("torch", 3, q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if HAS_EXT:
        cpu, cgrads = _run("cpu", 3, q, k, v)
        assert torch.equal(out, cpu) and all(torch.equal(a, b) for a, b in zip(grads, cgrads))


@pytest.mark.parametrize("be", [TRITON, pytest.param("cpu", marks=needs_ext), "torch"])
def test_dropout_empty_and_rows_without_keys(be):
    # T > S causal: queries that see no key stay zero, with finite zero gradients.
    dev = _dev(be)
    q = torch.randn(1, 2, 9, 16, device=dev, requires_grad=True)
    k, v = torch.randn(1, 2, 4, 16, device=dev), torch.randn(1, 2, 4, 16, device=dev)
    out = ops.attention(q, k, v, dropout_p=0.5, backend=be)
    assert torch.all(out[:, :, :5] == 0)
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.all(dq[:, :, :5] == 0) and torch.isfinite(dq).all()
    empty = ops.attention(q[:, :, :0], k, v, dropout_p=0.5, backend=be)
    assert empty.shape == (1, 2, 0, 16)


Q, K, V = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.1", None,
                                 torch.tensor(0.1)], ids=repr)
def test_bad_dropout_p(bad):
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(Q, K, V, dropout_p=bad)


def test_cuda_backend_refuses_dropout():
    with pytest.raises(ValueError, match=r"cuda backend has no dropout.*'triton', 'cpu', 'torch'"):
        ops.attention(Q, K, V, dropout_p=0.1, backend="cuda")


def test_env_backend_without_dropout_is_refused(monkeypatch):
    monkeypatch.setenv("MINIGPT_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="dropout"):
        ops.attention(Q, K, V, dropout_p=0.1)


@pytest.mark.parametrize("be", [TRITON, pytest.param("cpu", marks=needs_ext), "torch"])
def test_dropout_compiles_fullgraph(be):
    def block(q, k, v):
        return (ops.attention(q, k, v, dropout_p=0.25, backend=be) * 2).sum()

    q, k, v = _qkv(_dev(be))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v))
    # The seed is drawn inside the graph from the same generator: eager gives the same.
    torch.manual_seed(5)
    ref = block(q, k, v)
    rgrads = torch.autograd.grad(ref, (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads, rgrads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


# ---- the model ------------------------------------------------------------------------------

def test_model_attention_dropout_train_and_eval(monkeypatch):
    cfg = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=50,
                    dropout=0.2)
    model = GPT(cfg)
    idx = torch.randint(0, 50, (2, 12))
    seen = []
    orig = ops.attention_qkv  # the model's op for a learned-position GPT without a cache

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dropout_p", 0.0))
        return orig(*args, **kwargs)

    monkeypatch.setattr(ops, "attention_qkv", spy)
    model.train()
    a, _ = model(idx)
    b, _ = model(idx)
    assert not torch.equal(a, b)
    assert seen == [0.2] * 4  # each layer, each pass: the probabilities are dropped
    seen.clear()
    model.eval()
    with torch.no_grad():
        c, _ = model(idx)
        d, _ = model(idx)
    assert torch.equal(c, d)
    assert seen == [0.0] * 4
    # Training backpropagates through it.
    model.train()
    _, loss = model(idx, targets=idx)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
