import functools
import json
import os
import warnings

import torch

try:
    from triton import knobs as _knobs
except ImportError:  # Triton < 3.4 (torch <= 2.8 pins one): the backend refuses it (MIN_TRITON),
    _knobs = None    # but this module must still import, for the launch rules and the tests


# Host-side integer helpers. Triton 3.6's triton.cdiv and triton.next_power_of_2 are
# constexpr functions whose Python call unwraps every argument: ~4 us a call, ~30 us of each
# LayerNorm forward + backward's host time (cProfile, kernels mocked out).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 (which gives 0 for 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def interpreting() -> bool:
    """Triton runs in its CPU interpreter (TRITON_INTERPRET, settled by minigpt/__init__).
    Triton's own reading, which @triton.jit used to make the kernels interpreted ones: it takes
    "true", "on", "yes" and "y" too, and this reading only "1" had launched interpreted kernels
    as compiled ones (TRITON_INTERPRET=true: attention failed in capped_launch)."""
    if _knobs is None:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"  # older Triton's own reading
    return _knobs.runtime.interpret


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
    if N <= MAX_FUSED:
        return next_pow2(N), True
    return BLOCK_WIDE, False


def row_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


# Row-parallel backward (layer_norm, rms_norm): each program walks a slice of rows, ROWS at a
# time when a row is narrow. One 768-wide bf16 row is 1.5 KB per operand; an H200 ran GPT-2's
# LayerNorm backward (16384 x 768) at ~1/5 of its copy bandwidth one row at a time
# (benchmarks/results/bench_train_cuda-h200_profile.md). A tile of up to BWD_TILE elements puts
# several rows' loads in flight at once.
BWD_TILE = 4096


# The rule's tiles are half of BWD_TILE, 16 values a thread: on the H100 the sweep
# (benchmarks/results/sweep_norm_bwd_cuda-h100.md, 45 shapes each) ranked the former rule's
# 4096-value tiles at 8 values a thread and 4 programs per SM last but a few at both widths it
# measured, 1.55x (GPT-2's 16384 x 768 with a fp32 residual) and 4.05x (4096 x 1024 bf16)
# slower than the best; (2 rows, 4 warps, 2 per SM), what this rule gives rows of 1024, was
# first and second. 16 warps of 8 values also take 90-130 registers a thread: one program an
# SM, where the rule asked for four.
BWD_RULE_TILE = 2048
BWD_VALUES_PER_THREAD = 16


def bwd_rows(block: int) -> int:
    """Rows per step of the backward's walk for rows held in one ``block``."""
    return max(1, min(16, BWD_RULE_TILE // block))


def bwd_pipeline(rows: int, block: int) -> bool:
    """Whether the backward loads its next tile before this tile's reductions (a one-deep
    software pipeline): for tiles of up to BWD_TILE values. A wider tile (one row of up to
    MAX_FUSED) has 16 values a thread per operand at 16 warps, enough bytes in flight without
    it, and a second copy of x, dy and the residual gradient does not fit in registers: the
    fp32 LayerNorm backward with a residual at 8192 columns compiled to 848 bytes of stack a
    thread on sm_90 and ran its fwd+bwd at 0.44x eager on an H100 (1.81x before the residual
    gradient joined the pipeline)."""
    return rows * block <= BWD_TILE


def x_grad_buffer(h, x_dtype, split: bool):
    """(whether, buffer) for a norm backward's second dx, x's gradient in a tensor of its own
    written by the same kernel: in x's dtype where that is narrower than h's, or (``split``)
    a copy for x beside a residual that is a leaf too (ops/_eager.x_grad); else empty."""
    two = split or (x_dtype is not None and x_dtype != h.dtype)
    return two, (torch.empty_like(h, dtype=x_dtype or h.dtype) if two else h.new_empty(0))


# Rows one backward program sums its dweight/dbias terms over, at most: it adds them one after
# another in fp32, and a slice of 2^17 rows (the interpreter's 4 programs at 2^19 rows; an
# H100's 264 to 1056 at 3.5e7 to 1.4e8) put dbias 1e-3 off. The C++ kernels' bound is
# csrc/common.h kMaxBlockRows.
MAX_PROGRAM_ROWS = 1024


def bwd_programs(device: torch.device, M: int, rows: int, per_sm: int = 4):
    """(programs, rows per program) for the backward over M rows walked ``rows`` at a time: a
    few programs per SM (num_programs), each with a multiple of ``rows`` rows, and more
    programs where one would pass MAX_PROGRAM_ROWS rows."""
    per = cdiv(cdiv(M, num_programs(device, cdiv(M, rows), per_sm)), rows) * rows
    per = min(per, max(rows, MAX_PROGRAM_ROWS // rows * rows))
    return cdiv(M, per), per


# Measured launch shapes for the norm backwards, per GPU architecture, written by
# benchmarks/sweep_norm_bwd.py --write where a candidate beat bwd_shape's rule (as
# attention_tuned.json is for the attention tiles). Keyed by op, block width and h's dtype.
NORM_BWD_TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "norm_bwd_tuned.json")
_norm_bwd_tuned: dict = {}


def norm_bwd_key(op: str, block: int, h_dtype: torch.dtype) -> str:
    """The key of one entry of norm_bwd_tuned.json, e.g. "layer_norm/block1024/float32"."""
    return f"{op}/block{block}/{str(h_dtype).replace('torch.', '')}"


def tuned_bwd_shape(op: str, block: int, h_dtype: torch.dtype, device: torch.device):
    """The measured (ROWS, num_warps, programs per SM) for this backward on this GPU's
    architecture, or None (then bwd_shape's rule)."""
    if device.type != "cuda":
        return None
    table = tuned_table(NORM_BWD_TUNED_PATH, _norm_bwd_tuned, device, "shape")
    return table.get(norm_bwd_key(op, block, h_dtype))


def tuned_table(path: str, cache: dict, device: torch.device, field: str) -> dict:
    """key -> tuple(entry[field]) of a per-architecture tuned table (JSON, {"sm90": {key:
    entry}}) for this GPU, read once per architecture into ``cache``."""
    arch = capability_name(device)
    if arch not in cache:
        table = {}
        if os.path.exists(path):
            with open(path) as f:
                table = json.load(f).get(arch, {})
        cache[arch] = {k: tuple(v[field]) for k, v in table.items()}
    return cache[arch]


def bwd_shape(block: int, single: bool, config=None):
    """(ROWS, num_warps, programs per SM) of a norm backward: ``config`` when given (the
    sweep's candidates, benchmarks/sweep_norm_bwd.py), else the default rule: tiles of up to
    BWD_RULE_TILE values (whole rows), BWD_VALUES_PER_THREAD values a thread, 2 programs per
    SM (more where they are of one or two warps); a row wider than one block streams, one
    row at a time, at 16 warps and 4 programs per SM."""
    if config is not None:
        rows, warps, per_sm = config
        if rows < 1 or (rows & (rows - 1)) or (not single and rows != 1):
            raise ValueError(f"ROWS must be a power of two (1 for rows wider than one block), "
                             f"got {rows}")
        return rows, warps, per_sm
    if not single:
        return 1, row_warps(block), 4
    rows = bwd_rows(block)
    warps = min(16, max(1, rows * block // (32 * BWD_VALUES_PER_THREAD)))
    return rows, warps, max(2, 8 // warps)


# ---------------------------------------------------------------------------------------------
# Register caps. An SM holds as many blocks of a kernel at once as its registers, shared
# memory and warp slots all allow; registers go per warp in units of 256 (8 a thread). A
# kernel a few registers over a boundary loses a whole block per SM, which no spill count
# shows: the 16-bit D 128 attention forward went from 128 to 130 registers (an output-stride
# change), from two blocks an SM to one, and from 1.02x to 0.85x SDPA-flash on an H100.
# capped_launch gives such a kernel ptxas's register limit (Triton's ``maxnreg``) at the
# boundary below, where shared memory and warps leave room for one more block, and keeps it
# only where ptxas compiles it without spilling. A cap changes register allocation, never the
# instructions' arithmetic: results are the same bits. MINIGPT_REG_CAP=0 turns it off (for
# benchmarks/bench_reg_cap.py, which measures what it buys).
# ---------------------------------------------------------------------------------------------
REG_CAP = os.environ.get("MINIGPT_REG_CAP", "1") != "0"
RESERVED_SMEM_PER_BLOCK = 1024  # the CUDA runtime's own share of each block's shared memory
_caps: dict = {}


def sm_limits(device: torch.device):
    """(registers, shared memory bytes, threads) one SM holds, or None where torch does not
    report them (then nothing is capped)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    p = torch.cuda.get_device_properties(index)
    limits = tuple(getattr(p, name, 0) for name in (
        "regs_per_multiprocessor", "shared_memory_per_multiprocessor",
        "max_threads_per_multi_processor"))
    return limits if all(limits) else None


def blocks_per_sm(regs: int, warps: int, shared: int, limits) -> int:
    """How many blocks of a kernel (``regs`` registers a thread, ``warps`` warps, ``shared``
    bytes of shared memory) one SM with ``limits`` (sm_limits) holds at once."""
    sm_regs, sm_smem, sm_threads = limits
    per_warp = cdiv(regs * 32, 256) * 256
    return min(sm_regs // (per_warp * warps), sm_smem // (shared + RESERVED_SMEM_PER_BLOCK),
               sm_threads // (32 * warps))


def kernel_resources(compiled):
    """(registers a thread, bytes spilled) of a compiled Triton kernel: known once its binary
    is loaded. tests/test_triton_compile.py, which compiles without a GPU, reads them from
    ptxas's log instead."""
    if hasattr(compiled, "result"):  # Triton's asynchronous compile mode hands out a future
        compiled = compiled.result()
    compiled._init_handles()
    return compiled.n_regs, compiled.n_spills


def _decide_cap(kernel, grid, args, kwargs, device):
    limits = sm_limits(device)
    if limits is None:
        return None
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    regs, _ = kernel_resources(compiled)
    warps, shared = compiled.metadata.num_warps, compiled.metadata.shared
    have = blocks_per_sm(regs, warps, shared, limits)
    want = have + 1
    if blocks_per_sm(8, warps, shared, limits) < want:
        return None  # shared memory or warp slots bind, not registers
    cap = min(255, limits[0] // (want * warps * 32) // 8 * 8)
    if cap < 32 or cap >= regs:
        return None
    capped = kernel.warmup(*args, grid=grid, maxnreg=cap, **kwargs)
    regs_c, spills = kernel_resources(capped)
    if spills or blocks_per_sm(regs_c, warps, shared, limits) < want:
        return None
    return cap


def _int_specialization(kernel, args):
    """How Triton specializes ``args``' integers (== 1, divisible by 16; not the
    do_not_specialize ones, e.g. a dropout seed): these change the compiled code (an MHA
    kernel's heads ratio of 1 drops its GQA loop, and 24 of its registers)."""
    return tuple(a == 1 or (a % 16 == 0) * 2 for p, a in zip(kernel.params, args)
                 if a.__class__ is int and not p.do_not_specialize)


def cap_key(kernel, key, device, args):
    """Where capped_launch keeps a decision: the launcher's ``key``, the GPU, and how Triton
    specializes the integer arguments."""
    return key, device.index, _int_specialization(kernel, args)


def capped_launch(kernel, grid, key, device, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, with a register cap where one wins a block per SM
    without spilling (see above). The decision is made once per ``key``, GPU and specialization
    of the integer arguments (cap_key), before the first launch (two compiles), so every
    launch under them runs the same binary. ``key`` must name what else shapes the kernel's
    register use: its constexprs, num_warps, num_stages and element types. A launch
    specialized otherwise under the same key (a misaligned pointer) reuses its decision, which
    then costs at most speed."""
    if REG_CAP and not interpreting():
        key = cap_key(kernel, key, device, args)
        cap = _caps.get(key, _caps)
        if cap is _caps:
            try:
                cap = _decide_cap(kernel, grid, args, kwargs, device)
            except Exception as e:  # a speed decision: never the reason a launch fails
                warnings.warn(f"{kernel.__name__}: no register cap ({type(e).__name__}: {e})")
                cap = None
            _caps[key] = cap
        if cap is not None:
            return kernel[grid](*args, maxnreg=cap, **kwargs)
    return kernel[grid](*args, **kwargs)
