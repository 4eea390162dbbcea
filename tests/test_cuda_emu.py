"""The CPU CUDA emulator (tests/cuda_emu) checks itself here: shuffles, barriers, dynamic shared
memory, launch limits, and the misuses it must refuse rather than run. The kernels' own tests
through it are tests/test_cuda_emu_*.py."""
import ctypes

import pytest
import torch

from tests.cuda_emu import build as B


def _fn(emu, name, *argtypes):
    f = getattr(emu.lib, name)
    f.argtypes, f.restype = list(argtypes), ctypes.c_int

    def call(*args):
        emu.lib.minigpt_emu_clear()  # as Emulator.call: no error left over from another test
        return f(*args)
    return call


def _message(emu):
    return emu.lib.minigpt_emu_message().decode()


def test_translate_rewrites_launches_and_dynamic_shared_memory():
    src = ("extern __shared__ float smem[];\n"
           "k<T, 4><<<dim3(a, b), 128,\n  bytes, s>>>(x, y);\n"
           "z<<<1, 32>>>();\n")
    out = B.translate(src)
    assert "float* smem = static_cast<float*>(::emu::dynamic_smem());" in out
    assert "::emu::Launch(dim3(a, b), 128,\n  bytes, s)(k<T, 4>, x, y);" in out
    assert "::emu::Launch(1, 32)(z);" in out
    assert out.count("\n") == src.count("\n")  # line numbers in messages stay the source's


def test_signatures_cover_every_launcher():
    text = (B.CSRC / "cuda_launchers.h").read_text()
    sigs = B.launcher_signatures()
    assert set(sigs) == {w for w in text.replace("(", " ").split() if w.startswith("minigpt_")
                         and w.endswith("_cuda")}
    assert len(sigs["minigpt_attention_fwd_cuda"]) == 9
    assert sigs["minigpt_attention_fwd_cuda"][0] is B.MgAttnGeo


@pytest.mark.parametrize("kind,arg,expect", [
    (0, 7, lambda lane: 7),
    (1, 5, lambda lane: lane ^ 5),
    (2, 3, lambda lane: lane + 3 if lane + 3 < 32 else lane),
    (3, 4, lambda lane: lane - 4 if lane >= 4 else lane),
    (4, 9, lambda lane: lane ^ 9 if (lane ^ 9) // 8 == lane // 8 else lane),
], ids=["shfl", "xor", "down", "up", "xor-width8"])
def test_shuffles(cuda_emu, kind, arg, expect):
    f = _fn(cuda_emu, "emu_test_shuffle", ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int)
    threads = 96  # three warps: lanes come from their own warp
    out = torch.full((threads,), -1, dtype=torch.int32)
    assert f(out.data_ptr(), threads, kind, arg) == 0, _message(cuda_emu)
    want = torch.tensor([1000 + 32 * (t // 32) + expect(t % 32) for t in range(threads)],
                        dtype=torch.int32)
    assert torch.equal(out, want)


@pytest.mark.parametrize("threads", [32, 100, 1024])
def test_syncthreads_orders_shared_memory(cuda_emu, threads):
    f = _fn(cuda_emu, "emu_test_reverse", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_int)
    x = torch.randn(3, threads)
    out = torch.empty_like(x)
    assert f(x.data_ptr(), out.data_ptr(), 3, threads) == 0, _message(cuda_emu)
    assert torch.equal(out, x.flip(1))


@pytest.mark.parametrize("block", [0, 1])
def test_missing_barrier_gives_wrong_results(cuda_emu, block):
    # Without the __syncthreads, a warp reads slots another warp has not written yet: in even
    # blocks the last warp runs first, in odd blocks the first one does; both must go wrong.
    f = _fn(cuda_emu, "emu_test_racy_reverse", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_int)
    x = torch.randn(2, 64)
    out = torch.empty_like(x)
    assert f(x.data_ptr(), out.data_ptr(), 2, 64) == 0, _message(cuda_emu)
    wrong = out[block] != x[block].flip(0)
    assert wrong.any()


@pytest.mark.parametrize("mode", [0, 3], ids=["wait", "two-batches"])
def test_cp_async_lands_at_the_wait(cuda_emu, mode):
    f = _fn(cuda_emu, "emu_test_cp_async", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_int)
    x = torch.randn(64, 4)
    out = torch.zeros_like(x)
    assert f(x.data_ptr(), out.data_ptr(), 64, mode) == 0, _message(cuda_emu)
    assert torch.equal(out, x.flip(0))


def test_cp_async_read_before_the_wait_is_stale(cuda_emu):
    # A kernel that reads a cp.async destination before its wait reads what was there before
    # (the emulator's NaN fill), so such a kernel fails its tests here.
    f = _fn(cuda_emu, "emu_test_cp_async", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_int)
    x = torch.randn(64, 4)
    out = torch.zeros_like(x)
    assert f(x.data_ptr(), out.data_ptr(), 64, 1) == 0, _message(cuda_emu)
    # Block 0 runs its last warp first: threads 32-63 read the slots of threads 0-31, whose
    # copies have not landed yet.
    assert torch.isnan(out[32:]).all()


def test_cp_async_never_waited_fails_the_launch(cuda_emu):
    f = _fn(cuda_emu, "emu_test_cp_async", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_int)
    x = torch.randn(64, 4)
    out = torch.zeros_like(x)
    assert f(x.data_ptr(), out.data_ptr(), 64, 2) != 0
    assert "cp.async copies it never waited for" in _message(cuda_emu)


def test_misaligned_vector_load_fails_the_launch(cuda_emu):
    f = _fn(cuda_emu, "emu_test_pack_load", ctypes.c_void_p, ctypes.c_void_p)
    x = torch.randn(16)
    out = torch.zeros(1)
    assert f(x.data_ptr(), out.data_ptr()) == 0, _message(cuda_emu)  # aligned: fine
    assert out.item() == pytest.approx(x[:4].sum().item(), rel=1e-6)
    assert f(x[1:].data_ptr(), out.data_ptr()) == 716  # cudaErrorMisalignedAddress
    msg = _message(cuda_emu)
    assert "misaligned address" in msg and "16-byte" in msg and "cuda_common.cuh" in msg
    assert f(x.data_ptr(), out.data_ptr()) == 0, _message(cuda_emu)  # and the next one runs


def test_dynamic_shared_memory_and_exited_threads(cuda_emu):
    f = _fn(cuda_emu, "emu_test_dyn_smem", ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
            ctypes.c_int64, ctypes.c_int)
    out = torch.full((64,), -1.0)
    # 40 of 64 threads live: the 24 that returned count as arrived at __syncthreads.
    assert f(out.data_ptr(), 64, 40, 64 * 4, 0) == 0, _message(cuda_emu)
    assert torch.equal(out[:40], torch.arange(39, -1, -1).float() ** 2)
    assert (out[40:] == -1).all()


def test_dynamic_shared_memory_limit_needs_opt_in(cuda_emu):
    f = _fn(cuda_emu, "emu_test_dyn_smem", ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
            ctypes.c_int64, ctypes.c_int)
    out = torch.empty(32)
    assert f(out.data_ptr(), 32, 32, 64 * 1024, 0) != 0
    assert "65536" in _message(cuda_emu) and "shared memory" in _message(cuda_emu)
    assert f(out.data_ptr(), 32, 32, 64 * 1024, 1) == 0, _message(cuda_emu)
    assert f(out.data_ptr(), 32, 32, 240 * 1024, 1) != 0  # more than an H100 block has


def test_unwritten_dynamic_shared_memory_reads_nan(cuda_emu):
    f = _fn(cuda_emu, "emu_test_uninit_smem", ctypes.c_void_p, ctypes.c_int)
    out = torch.zeros(32)
    assert f(out.data_ptr(), 32) == 0, _message(cuda_emu)
    assert torch.isnan(out).all()


def test_divergent_barrier_is_reported(cuda_emu):
    f = _fn(cuda_emu, "emu_test_divergent_barrier", ctypes.c_void_p)
    out = torch.zeros(32)
    assert f(out.data_ptr()) != 0
    msg = _message(cuda_emu)
    assert "cannot make progress" in msg and msg.count("__syncthreads (line") == 2


def test_lane_exiting_before_a_shuffle_is_reported(cuda_emu):
    f = _fn(cuda_emu, "emu_test_exited_lane", ctypes.c_void_p)
    out = torch.zeros(32)
    assert f(out.data_ptr()) != 0
    assert "__shfl_*_sync" in _message(cuda_emu)
    # The emulator recovers: the next launch runs normally.
    g = _fn(cuda_emu, "emu_test_shuffle", ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
            ctypes.c_int)
    res = torch.empty(32, dtype=torch.int32)
    assert g(res.data_ptr(), 32, 1, 1) == 0, _message(cuda_emu)


@pytest.mark.parametrize("gx,gy,threads,ok", [
    (4, 3, 1024, True), (1, 65535, 32, True), (1, 65536, 32, False), (1, 1, 1025, False),
    (0, 1, 32, False)])
def test_launch_limits(cuda_emu, gx, gy, threads, ok):
    f = _fn(cuda_emu, "emu_test_launch", ctypes.c_int, ctypes.c_int, ctypes.c_int)
    rc = f(gx, gy, threads)
    assert (rc == 0) == ok, _message(cuda_emu)
    if not ok:
        assert rc == 9 and "invalid launch" in _message(cuda_emu)  # cudaErrorInvalidConfiguration


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_conversions_round_like_torch(cuda_emu, dtype):
    # Every rounding path of fp32 -> fp16/bf16 (normal, subnormal, ties to even, overflow, inf,
    # NaN), through cuda_common.cuh's from_f/to_f, bit for bit against torch's conversion.
    f = _fn(cuda_emu, "emu_test_convert", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int)
    ties = [1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 2 ** -24 * 1.5,
            2 ** -24 * 2.5, 2 ** -24 * 0.5, 65504., 65519., 65520., 70000., -7e4, 1e-45,
            3.3895e38, float("inf"), -float("inf"), 0.0, -0.0]
    x = torch.cat([torch.randn(3000) * 10, torch.randn(1000) * 1e-6, torch.randn(1000) * 1e5,
                   torch.randn(500) * 1e-40, torch.tensor(ties), torch.tensor([float("nan")])])
    out = torch.empty(x.shape, dtype=dtype)
    back = torch.empty_like(x)
    assert f(x.data_ptr(), out.data_ptr(), back.data_ptr(), x.numel(),
             B.DTYPE_CODES[dtype]) == 0, _message(cuda_emu)
    want = x.to(dtype)
    nan = torch.isnan(want)
    assert torch.isnan(out[nan]).all()
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert torch.equal(back[~nan], want[~nan].float())
