"""Large tensors and launch-grid limits, on every backend, kept cheap in time and memory.

- Offsets past 2**31 elements: strided views over a ``torch.empty`` storage whose last element
  lies more than 2**31 elements past the first. Only the viewed elements are written, so only
  their pages become resident (the rest is reserved address space; needs the kernel's memory
  overcommit, which the fixture checks), and the kernels that take strides read only those.
- CUDA grid limits (y and z: 65535 blocks): the CUDA emulator (tests/cuda_emu) enforces them
  like a GPU, and lowers them for a test (minigpt_emu_set_max_grid_yz), so that a launcher's
  handling of the limit is reached with a handful of blocks instead of 65536 (a GPU would need
  over a million queries for the attention kernels).
"""
import math

import pytest
import torch

from minigpt import reference
from tests._tol import assert_close
from tests.test_cuda_emu_attention import _bwd, _check_lse, _f64, _fwd, _lse_ref, _qkv, _ref_grads

F32, BF16 = torch.float32, torch.bfloat16


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

    do = torch.randn_like(q)
    ref_out, lowp = _ref_grads(q, k, v, do, causal, scale)
    _, lse32 = _lse_ref(q, k, v, causal, scale)
    _, truth = _ref_grads(*_f64(q, k, v, do), causal, scale)
    _, *grads = _bwd(emu, do, q, k, v, ref_out.contiguous(), lse32.float().contiguous(), causal,
                     scale)
    for name, g, g64, gl in zip(("dq", "dk", "dv"), grads, truth, lowp):
        assert_close(g, g64, gl, dtype, name=name)
