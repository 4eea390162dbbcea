import functools

import torch


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """How many persistent programs to launch for ``work_items`` rows: a few per SM on a GPU,
    a handful in the interpreter (each program is a Python loop there)."""
    if device.type == "cuda":
        cap = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        cap *= per_sm
    else:
        cap = 4
    return max(1, min(cap, work_items))
