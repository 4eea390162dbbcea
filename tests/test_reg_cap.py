"""kernels/_util.capped_launch: a Triton kernel that registers hold to fewer blocks per SM than
its shared memory and warps allow gets ptxas's register cap at the boundary below, where that
compiles without spills. The decision is tested here on a stand-in kernel (what a GPU reports
per compile is given by the test); tests/test_triton_compile.py checks what it gives the real
attention kernels compiled for sm_90, and benchmarks/bench_reg_cap.py what it buys on a GPU."""
from types import SimpleNamespace

import pytest
import torch

from minigpt.kernels import _util

H100 = (65536, 228 * 1024, 2048)  # registers, shared memory bytes, threads per SM


@pytest.mark.parametrize("regs, warps, shared, blocks", [
    (128, 8, 114688, 2),   # the D 128 attention forward at T 512 before an output-stride change
    (130, 8, 114688, 1),   # ... and after it: 136 a thread as allocated, 34816 a block
    (152, 8, 57856, 1),    # GPT-2's D 64 dK/dV tiles
    (128, 8, 57856, 2),
    (182, 8, 131072, 1),   # shared memory binds: (131072 + 1024) * 2 > 228 KiB
    (32, 16, 0, 4),        # warp slots bind: 64 warps an SM
    (255, 4, 0, 2),
])
def test_blocks_per_sm(regs, warps, shared, blocks):
    assert _util.blocks_per_sm(regs, warps, shared, H100) == blocks


class FakeKernel:
    """A JITFunction's surface that capped_launch uses: params, warmup (a compile) and
    kernel[grid](...) (a launch). ``regs``: maxnreg (None uncapped) -> (registers, spills)
    ptxas would give."""
    __name__ = "fake_kernel"

    def __init__(self, regs, warps, shared):
        self.regs, self.warps, self.shared = regs, warps, shared
        self.params = [SimpleNamespace(do_not_specialize=False),
                       SimpleNamespace(do_not_specialize=True),   # a seed
                       SimpleNamespace(do_not_specialize=False)]
        self.compiles, self.launches = [], []

    def warmup(self, *args, grid, maxnreg=None, **kwargs):
        self.compiles.append(maxnreg)
        md = SimpleNamespace(num_warps=self.warps, shared=self.shared)
        return SimpleNamespace(metadata=md, resources=self.regs[maxnreg])

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs.get("maxnreg"))
        return launch


@pytest.fixture
def gpu(monkeypatch):
    """capped_launch as on an H100, with fresh decisions."""
    monkeypatch.setattr(_util, "_caps", {})
    monkeypatch.setattr(_util, "REG_CAP", True)
    monkeypatch.setattr(_util, "interpreting", lambda: False)
    monkeypatch.setattr(_util, "sm_limits", lambda device: H100)
    monkeypatch.setattr(_util, "kernel_resources", lambda compiled: compiled.resources)
    return monkeypatch


def launch(kernel, key="k", args=(4, 123, 64)):
    _util.capped_launch(kernel, (1,), key, torch.device("cuda", 0), *args, BLOCK=64,
                        num_warps=kernel.warps)


def test_cap_that_wins_a_block_without_spills(gpu):
    k = FakeKernel({None: (130, 0), 128: (128, 0)}, warps=8, shared=114688)
    launch(k)
    assert k.compiles == [None, 128] and k.launches == [128]
    launch(k)  # decided once per key: no more compiles, the same binary
    assert k.compiles == [None, 128] and k.launches == [128, 128]


def test_no_cap_where_it_spills(gpu):
    k = FakeKernel({None: (245, 0), 128: (128, 1592)}, warps=8, shared=57856)
    launch(k)
    assert k.compiles == [None, 128] and k.launches == [None]


@pytest.mark.parametrize("regs, warps, shared", [
    (182, 8, 131072),  # shared memory binds: a cap cannot win a block
    (120, 8, 57856),   # already two blocks; a third needs 80 registers
    (32, 16, 0),       # warp slots bind (as registers do: four blocks of 16 warps)
])
def test_no_cap_where_registers_do_not_bind_or_it_would_not_fit(gpu, regs, warps, shared):
    caps = {None: (regs, 0), 80: (80, 4)}
    k = FakeKernel(caps, warps=warps, shared=shared)
    launch(k)
    assert k.launches == [None]
    assert k.compiles in ([None], [None, 80])  # at most the one probe that spilled


def test_a_specialization_is_its_own_decision(gpu):
    """An integer argument of 1 (an MHA heads ratio) compiles to other code: its own decision.
    A do_not_specialize argument (a seed) changing every call does not cost compiles."""
    k = FakeKernel({None: (130, 0), 128: (128, 0)}, warps=8, shared=114688)
    launch(k, args=(4, 1, 64))
    launch(k, args=(4, 2, 64))
    launch(k, args=(4, 3, 64))
    assert k.compiles == [None, 128]
    launch(k, args=(1, 3, 64))
    assert k.compiles == [None, 128, None, 128]
    assert k.launches == [128] * 4


def test_off_unknown_or_interpreted_launches_plainly(gpu):
    k = FakeKernel({None: (130, 0), 128: (128, 0)}, warps=8, shared=114688)
    gpu.setattr(_util, "REG_CAP", False)
    launch(k)
    gpu.setattr(_util, "REG_CAP", True)
    gpu.setattr(_util, "sm_limits", lambda device: None)  # torch reports no SM limits
    launch(k)
    assert k.compiles == [] and k.launches == [None, None]
    gpu.setattr(_util, "_caps", {})
    gpu.setattr(_util, "sm_limits", lambda device: H100)
    gpu.setattr(_util, "interpreting", lambda: True)
    launch(k)
    assert k.compiles == [] and k.launches == [None, None, None]


def test_failed_decision_warns_and_launches_plainly(gpu):
    k = FakeKernel({None: (130, 0), 128: (128, 0)}, warps=8, shared=114688)
    gpu.setattr(_util, "kernel_resources", lambda compiled: 1 / 0)
    with pytest.warns(UserWarning, match="no register cap.*ZeroDivisionError"):
        launch(k)
    assert k.launches == [None]
    launch(k)  # decided (no cap) once: no second warning, no more compiles
    assert k.compiles == [None] and k.launches == [None, None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compiles and "
                    "loads real kernels (tests/test_triton_compile.py checks the caps for "
                    "sm_90 without one)")
def test_capped_attention_on_gpu_same_bits(monkeypatch):
    """On a GPU: the D 128 forward at T 512 with 8-warp 64 x 64 tiles (two blocks an SM at
    128 registers, one at 130) launches capped, the capped kernel does not spill, and it
    computes the same bits as the uncapped one. The tiles are pinned: the tuned table's
    "/short" entry for this point (4 warps since 2026-11-27) is not register-bound, and the
    test is about the cap, not about which tiles the table holds."""
    from minigpt.kernels import attention as attn

    monkeypatch.setattr(_util, "_caps", {})
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 16, 512, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    monkeypatch.setattr(_util, "REG_CAP", False)
    tiles = (64, 64, 8, 3)
    plain, plain_lse = attn.attention_fwd(q, k, v, True, 128 ** -0.5, config=tiles)
    monkeypatch.setattr(_util, "REG_CAP", True)
    capped, capped_lse = attn.attention_fwd(q, k, v, True, 128 ** -0.5, config=tiles)
    fwd = {key: cap for key, cap in _util._caps.items() if key[0][0] == "fwd"}
    assert list(fwd.values()) == [128], fwd
    assert torch.equal(plain, capped) and torch.equal(plain_lse, capped_lse)
