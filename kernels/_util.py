import functools
import os

import torch


def interpreting() -> bool:
    """Triton runs in its CPU interpreter (TRITON_INTERPRET=1, settled by minigpt/__init__)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def capability_name(device: torch.device) -> str:
    """"sm90" for an H100/H200: the key of per-architecture tables (tuned tile sizes)."""
    major, minor = _capability(device.index if device.index is not None
                               else torch.cuda.current_device())
    return f"sm{major}{minor}"


def num_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """How many persistent programs to launch for ``work_items`` rows: a few per SM on a GPU,
    a handful in the interpreter (each program is a Python loop there)."""
    if device.type == "cuda":
        cap = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        cap *= per_sm
    else:
        cap = 4
    return max(1, min(cap, work_items))


# Row kernels (layer_norm, rms_norm, softmax): a row up to MAX_FUSED wide is held whole in
# registers; a wider one is streamed in BLOCK_WIDE chunks.
MAX_FUSED = 8192
BLOCK_WIDE = 4096


def row_block(N: int):
    """(BLOCK, SINGLE) for a row of N elements: the power of two covering it when it fits in
    one block, else the streaming chunk."""
    import triton

    if N <= MAX_FUSED:
        return triton.next_power_of_2(N), True
    return BLOCK_WIDE, False


def row_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)
