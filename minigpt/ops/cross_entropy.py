"""cross_entropy / fused_linear_cross_entropy: the dispatch point for the loss.

Backends: kernels/cross_entropy.py (triton), csrc/cross_entropy_cuda.cu (cuda), csrc/cross_entropy.cpp
(cpu), and for ``cross_entropy`` minigpt/reference/cross_entropy.py (torch). Semantics are
``F.cross_entropy`` on float32 logits: ``reduction`` "mean" (over targets that are not
``ignore_index``; NaN when every target is ignored, like PyTorch), "sum" or "none", and
``label_smoothing``. The loss comes back in float32 (float64 for float64 logits).

Memory, the point of these ops (Liger-Kernel's approach):

* ``cross_entropy`` never materializes the softmax. Each row's loss comes from an online
  logsumexp over the vocabulary in blocks, and when a gradient will be needed the same kernel
  writes ``dloss/dlogits`` (already scaled for the reduction) into a buffer of the logits' shape
  during the forward. Nothing else is saved, so the logits can be freed after the forward and the
  gradient takes their place; backward is a multiply by ``grad_output``.
* ``fused_linear_cross_entropy`` never materializes the (tokens, vocab) logits. It walks the
  tokens in chunks: ``logits = hidden_chunk @ weight.T (+ bias)`` (a torch matmul), the
  cross-entropy kernel overwrites that chunk of logits with its gradient in place, and the chunk's
  contribution to ``grad_hidden = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden``
  (and ``grad_bias``) is added before the next chunk (into fp32 sums; on CUDA cuBLAS adds the
  bf16/fp16 product into the fp32 ``grad_weight`` directly). With ``reduction`` "mean" or "sum"
  the gradients are computed in the forward and saved (backward scales them by the scalar
  ``grad_output``); with "none" the per-row ``grad_output`` is only known in backward, so backward
  recomputes the chunks. The chunk loop is the same for every backend, including "torch" (plain
  torch ops per chunk); only the per-chunk kernel differs.

Targets that are neither ``ignore_index`` nor in ``[0, V)`` raise ValueError. Checking costs one
host-device sync per call (which the mean's count of non-ignored targets needs anyway).
The gradient is first order only (no double backward).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from minigpt import _backend, reference
from minigpt.ops import _checks
from minigpt.ops._eager import bwd_op, eager_function, is_compiling, leaf_grad_stored, pick

OP = "cross_entropy"
FOP = "fused_linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
# Tokens in one chunk of fused_linear_cross_entropy. Liger's rule, chunk logits no larger than
# hidden (the chunk costs no more memory than the activations already held), is the start; but
# every chunk also reads all of weight and reads and writes all of the fp32 grad_weight sum, so
# small chunks make the loss memory-bound. A chunk's three products take 6*c*V*H flops against
# 8*V*H bytes of that sum: on an H200 (~700 dense bf16 TFLOP/s reached, ~4 TB/s) the sum's
# traffic is ~230/c of the products' time. So at least MIN_CHUNK_ROWS tokens (~20%) and at
# least MIN_CHUNK_ELEMENTS logits (64 MiB in fp32); the GPT-2 step on an H200 ran 50 chunks of
# 333 tokens (benchmarks/results/bench_train_cuda-h200_profile.md). On the H100 at 1024 tokens
# the grad_weight product (fp32 sum read and written, 310 MB) still took 203 us against 98-113
# for the chunk's two other products (bench_train_cuda-h100_profile.md): 1.4 ms of GPT-2's
# step. A GPU, where the memory is there, takes CUDA_MIN_CHUNK_ROWS (~7% at 4096; 412 MB of bf16
# logits for GPT-2's vocabulary). Chunks of 256 tokens or more are cut to a multiple of 128, the
# GEMM tile height, so no chunk ends in a mostly empty tile. The row floor yields for huge
# vocabularies: its logits stay within MAX_FLOOR_ELEMENTS (512 MiB in bf16).
MIN_CHUNK_ELEMENTS = 1 << 24
MIN_CHUNK_ROWS = 1024
CUDA_MIN_CHUNK_ROWS = 4096
MAX_FLOOR_ELEMENTS = 1 << 28


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Checks


def _check_common(op, target, reduction, ignore_index):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{op}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: target must hold class indices as int64 or int32, got "
                        f"{target.dtype} (class probabilities are not supported)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    # The kernels and F.cross_entropy take it as an int64; a wider Python int failed inside
    # them (pybind's argument error, "Overflow when unpacking long long") or, in Triton, wrapped.
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"{op}: ignore_index must fit in int64, got {ignore_index}")


def _target_stats(op: str, target: Tensor, V: int, ignore_index: int) -> int:
    """Raise on a target outside [0, V) that is not ignore_index; return the count of
    non-ignored targets. One sync for both."""
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= V))
    n_bad, n_valid = torch.stack([bad.sum(), valid.sum()]).tolist()
    if n_bad:
        _raise_out_of_range(op, n_bad, V, ignore_index, f", e.g. {target[bad][0].item()}")
    return int(n_valid)


def _raise_out_of_range(op: str, n_bad: int, V: int, ignore_index: int, example: str = ""):
    raise ValueError(f"{op}: {n_bad} target(s) out of range{example}: each target must be in "
                     f"[0, {V}) (the number of classes) or equal ignore_index ({ignore_index})")


def _grad_scale(reduction: str, n_valid: int) -> float:
    # With every target ignored the gradient is zero anyway (and the mean loss NaN, as in torch).
    return 1.0 / n_valid if reduction == "mean" and n_valid > 0 else 1.0


def _scaled(g: Tensor, dloss: Tensor) -> Tensor:
    """g * dloss for a 0-dim dloss. The usual ``loss.backward()`` has dloss == 1: then the stored
    gradient itself is returned, so backward needs no second buffer of its size (autograd only
    reads it, and copies it before accumulating if the graph is retained). Checking costs a
    sync on GPU; under torch.compile it always multiplies."""
    if not is_compiling() and bool(dloss == 1):
        return g
    return g * dloss  # a 0-dim dloss keeps g's dtype


def _defer_scale(t: Tensor) -> bool:
    """Whether the mean's 1 / n_valid stays on the device (``defer_scale``): always where host
    checks may not run, and on a GPU with them too. There the synced path's backward asks
    whether dloss is 1 (``_scaled``): a second sync per loss, in the middle of the step, that
    empties the launch queue; and under gradient accumulation (dloss = 1 / K) it multiplies
    out of place into a second buffer of the gradients' size. Deferred, backward scales the
    stored gradients in place, one pass with no sync, the code that torch.compile and a CUDA
    graph run. On the CPU a read costs nothing, and the synced path spares that pass for the
    usual dloss of 1."""
    return t.device.type != "cpu" or not _checks.host_checks(t)


def _valid_count(target: Tensor, ignore_index: int) -> Tensor:
    """The number of non-ignored targets as a 0-dim tensor on target's device: no sync."""
    return (target != ignore_index).sum()


def _pending_scale(reduction: str, n_valid: Tensor, dtype: torch.dtype) -> Tensor:
    """What stored gradients computed with grad_scale 1 still need: 1 / n_valid for "mean" (1
    with every target ignored: the gradient is zero then, as with _grad_scale)."""
    if reduction == "mean":
        return 1.0 / n_valid.clamp(min=1).to(dtype)
    return torch.ones((), dtype=dtype, device=n_valid.device)


def _scale_plan(op: str, target: Tensor, V: int, ignore_index: int, reduction: str,
                acc: torch.dtype, defer: bool):
    """(n_valid, the grad_scale the kernels write with, the 0-dim scale left for backward).
    ``defer``: n_valid stays on the device, the kernels write for scale 1 and the mean's
    1 / n_valid is pending (no sync; the range check only where host checks may run). Else
    one sync brings the count (with the range check) and nothing is pending."""
    if defer:
        if _checks.host_checks(target):
            _target_stats(op, target, V, ignore_index)
        n_valid = _valid_count(target, ignore_index)
        return n_valid, 1.0, _pending_scale(reduction, n_valid, acc)
    n_valid = _target_stats(op, target, V, ignore_index)
    return (n_valid, _grad_scale(reduction, n_valid),
            torch.ones((), dtype=acc, device=target.device))


_HANDED_OUT = (
    "cross-entropy: backward hands out its stored gradient itself (it never holds a second "
    "buffer of that size), and that tensor has changed since: accumulated into a leaf's .grad "
    "by an earlier .backward() through this retained graph, or edited in place. Run backward "
    "through the loss once per forward (torch.autograd.grad may be repeated), or use "
    "backend='torch'")


def _saved(ctx):
    """ctx.saved_tensors, with autograd's version-check failure explained (see _HANDED_OUT)."""
    try:
        return ctx.saved_tensors
    except RuntimeError as e:
        if "modified by an inplace operation" in str(e):
            raise RuntimeError(_HANDED_OUT) from e
        raise


def _kept_as_leaf_grad(ctx, inputs) -> bool:
    """Whether this backward's gradient for one of ``inputs`` (indices) will be stored as a
    leaf's .grad as it is (autograd keeps a gradient no one else holds rather than copying it),
    so that the next accumulation into that .grad writes over the stored buffer. False under
    torch.autograd.grad (the gradient is captured, not stored) and for non-leaf inputs."""
    return any(leaf_grad_stored(ctx, i) for i in inputs)


def _apply_pending(ctx, grads, factor: Tensor, inputs=(0,)):
    """Stored gradients times a 0-dim ``factor`` (dloss times the pending scale), with no host
    sync: the deferred path of backward (``defer_scale``). In place, so no second buffer of the
    gradients' size; a second backward through a retained graph finds them already scaled by
    the first call's factor and divides it out (out of place)."""
    if is_compiling():
        return tuple(g * factor for g in grads)  # traced: functional
    prev = getattr(ctx, "minigpt_applied", None)
    if prev is None:
        ctx.minigpt_applied = factor
        # Through .data: the in-place scaling is accounted for here, and autograd's version
        # check would otherwise refuse the saved tensors to a second backward.
        # Handed to a leaf's .grad (a .backward() into leaf tensors), the stored gradients are
        # that .grad from now on, and the next accumulation changes them behind this .data
        # (which autograd's version check does not see): a later backward must not read them.
        ctx.minigpt_spent = _kept_as_leaf_grad(ctx, inputs)
        return tuple(g.data.mul_(factor) for g in grads)
    if ctx.minigpt_spent:
        raise RuntimeError(_HANDED_OUT)
    if bool(prev == 0):
        raise RuntimeError("cross-entropy backward ran twice through a retained graph whose first "
                           "call had a zero incoming gradient: its stored gradients were scaled "
                           "to zero in place and cannot be recovered")
    return tuple(g * (factor / prev) for g in grads)


def _reduce(rows: Tensor, reduction: str, n_valid) -> Tensor:
    """The reduced loss; ``n_valid`` an int or a 0-dim tensor (the deferred path)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / n_valid if reduction == "mean" else total


# ----------------------------------------------------------------------------------------------
# The per-row kernel, one function over every backend


def _torch_rows(logits, target, grad, ignore_index, label_smoothing, grad_scale):
    """The per-row kernel in plain torch (the fused op's "torch" backend)."""
    x = logits.to(_acc(logits.dtype))
    V = x.shape[-1]
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    lsm = torch.log_softmax(x, dim=-1)
    loss = -(1.0 - label_smoothing) * lsm.gather(1, t).squeeze(1)
    if label_smoothing:
        loss = loss - label_smoothing / V * lsm.sum(-1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if grad is not None:
        g = lsm.exp_()
        if label_smoothing:
            g -= label_smoothing / V
        g.scatter_add_(1, t, torch.full(t.shape, label_smoothing - 1.0, dtype=g.dtype,
                                        device=g.device))
        g *= (valid.to(g.dtype) * grad_scale).unsqueeze(1)
        grad.copy_(g)
    return loss


def _rows(op, backend, logits, target, grad, ignore_index, label_smoothing, grad_scale):
    """Per-row loss of logits (M, V) contiguous against target (M,) int64; with ``grad`` (a
    buffer like logits, or logits itself) also writes grad_scale * dloss_i/dlogits into it."""
    if backend == "triton":
        from minigpt.kernels import cross_entropy as k

        return k.cross_entropy_fwd(logits, target, grad, ignore_index, label_smoothing, grad_scale)
    if backend == "torch":
        return _torch_rows(logits, target, grad, ignore_index, label_smoothing, grad_scale)
    rows, bad = _backend.extension().cross_entropy_fwd(logits, target, grad, ignore_index,
                                                       label_smoothing, grad_scale)
    if bad:  # CPU rows only (a count, not a tensor: no sync); the CUDA kernel gives them NaN
        _raise_out_of_range(op, bad, logits.shape[1], ignore_index)
    return rows


# ----------------------------------------------------------------------------------------------
# cross_entropy


def _ce_fwd_impl(logits: Tensor, target: Tensor, ignore_index: int, reduction: str,
                 label_smoothing: float, compute_grad: bool, backend: str,
                 defer_scale: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """logits (M, V) contiguous, target (M,) int64 -> reduced loss, with compute_grad the
    gradient of that loss w.r.t. logits (else an empty tensor), and the 0-dim scale that
    gradient still needs.

    ``defer_scale`` (no host checks: under torch.compile, while a CUDA graph is captured, in
    ``no_host_sync()``): the gradient is computed for grad_scale 1 and the mean's 1 / n_valid
    stays on the device, applied in backward with dloss; the target range is checked only if
    host checks may run then. Otherwise the count comes to the host (one sync, with the range
    check) and the gradient is written already scaled (the pending scale is 1)."""
    acc = _acc(logits.dtype)
    n_valid, grad_scale, pending = _scale_plan(OP, target, logits.shape[1], ignore_index,
                                               reduction, acc, defer_scale)
    grad = torch.empty_like(logits) if compute_grad else None
    rows = _rows(OP, backend, logits, target, grad, ignore_index, label_smoothing, grad_scale)
    loss = _reduce(rows.to(acc), reduction, n_valid)
    return loss, grad if grad is not None else logits.new_empty(0), pending


_ce_fwd = torch.library.custom_op("minigpt::cross_entropy_fwd", mutates_args=())(_ce_fwd_impl)


@_ce_fwd.register_fake
def _(logits, target, ignore_index, reduction, label_smoothing, compute_grad, backend,
      defer_scale=False):
    shape = (logits.shape[0],) if reduction == "none" else ()
    loss = logits.new_empty(shape, dtype=_acc(logits.dtype))
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad, logits.new_empty((), dtype=_acc(logits.dtype))


def _ce_setup(ctx, inputs, output):
    # The gradient buffer output gets no gradient: without this autograd would hand backward a
    # zero tensor of the logits' size for it.
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[3]
    ctx.compute_grad = inputs[5]
    ctx.defer = inputs[7] if len(inputs) > 7 else False
    ctx.save_for_backward(output[1], output[2])


def _ce_backward(ctx, dloss, _dgrad, _dpending):
    if not ctx.compute_grad:
        raise RuntimeError("cross_entropy: the forward ran without a gradient buffer (grad mode "
                           "was off or logits did not require grad)")
    grad, pending = _saved(ctx)
    if dloss is None:
        return (None,) * 8
    if ctx.reduction == "none":
        dlogits = (grad * dloss.unsqueeze(-1)).to(grad.dtype)
    elif ctx.defer:
        (dlogits,) = _apply_pending(ctx, (grad,), dloss * pending)
    else:
        dlogits = _scaled(grad, dloss)
    return dlogits, None, None, None, None, None, None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)
# Eager mode skips the custom op's costly autograd wrapper (see _eager.py).
_EagerCE = eager_function("_EagerCE", _ce_fwd_impl, _ce_setup, _ce_backward,
                          nondiff_outputs=(1, 2))


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  backend: Optional[str] = None) -> Tensor:
    """Cross-entropy of ``logits`` (..., V) against class indices ``target`` (...) (int64 or
    int32), computed in float32 without ever storing the softmax.

    ``reduction``: "mean" (over non-ignored targets), "sum" or "none" (shape of ``target``).
    ``backend``: "triton", "cuda", "cpu", "torch" or None (best for the device, or
    ``$MINIGPT_BACKEND``).
    """
    _checks.tensor(OP, "logits", logits)
    _checks.nonempty_last_dim(OP, "logits", logits)
    _check_common(OP, target, reduction, ignore_index)
    ignore_index = int(ignore_index)  # numpy integers too: the kernels take a Python int
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{OP}: target must have logits' shape without the class dimension, "
                         f"{tuple(logits.shape[:-1])}, got {tuple(target.shape)}")
    _checks.same_device(OP, logits=logits, target=target)
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real)
            or not 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{OP}: label_smoothing must be a number in [0, 1], got "
                         f"{label_smoothing!r}")
    label_smoothing = float(label_smoothing)

    V = logits.shape[-1]
    be = _backend.resolve(OP, backend, logits.device, logits.dtype)
    if be == "torch" or target.numel() == 0:
        if _checks.host_checks(target):
            _target_stats(OP, target, V, ignore_index)
        # F.cross_entropy takes int64 targets only; int32 is documented here.
        return reference.cross_entropy(logits, target.long(), ignore_index, reduction,
                                       label_smoothing)

    x2 = logits.reshape(-1, V).contiguous()
    t2 = target.reshape(-1).to(torch.int64).contiguous()
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    fwd = pick(_ce_fwd, _EagerCE, _ce_fwd_impl, x2)
    loss, _, _ = fwd(x2, t2, int(ignore_index), reduction, float(label_smoothing), compute_grad,
                     be, _defer_scale(x2))
    return loss.reshape(target.shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------------------------
# fused_linear_cross_entropy


def default_chunk_size(N: int, H: int, V: int, device_type: str = "cpu") -> int:
    """Tokens per chunk: logits as large as ``hidden``, but at least MIN_CHUNK_ROWS tokens
    (CUDA_MIN_CHUNK_ROWS on CUDA; as long as that is at most MAX_FLOOR_ELEMENTS logits) and
    MIN_CHUNK_ELEMENTS logits; at most all N tokens."""
    rows_floor = CUDA_MIN_CHUNK_ROWS if device_type == "cuda" else MIN_CHUNK_ROWS
    floor = min(rows_floor, MAX_FLOOR_ELEMENTS // V)
    rows = min(N, max(N * H // V, MIN_CHUNK_ELEMENTS // V, floor, 1))
    return rows - rows % 128 if rows >= 256 else rows


_FP32_SUM_MM: dict = {}  # device type -> whether aten::addmm.dtype_out ran there


def _add_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, acc in fp32 (fp64), a and b in the inputs' dtype.

    For bf16/fp16 inputs on CUDA, cuBLAS accumulates the product straight into the fp32 sum
    (addmm's out_dtype overload, torch >= 2.8). Forming each chunk's (V, H) product in bf16 and
    then adding it instead rounds it and costs a temporary written, read and added: a 4096 x 4096
    -> 128256 bf16 fwd+bwd took 100 ms against eager's 23 on an H200 (32 chunks, 1 GB each).
    Where the overload is missing (CPU, older torch) the product in the inputs' dtype is added.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    dev = acc.device.type
    if _FP32_SUM_MM.get(dev, dev == "cuda"):
        try:
            torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
            _FP32_SUM_MM[dev] = True
            return
        except torch.cuda.OutOfMemoryError:
            raise
        except (AttributeError, NotImplementedError, RuntimeError):
            _FP32_SUM_MM[dev] = False
    acc.add_(torch.mm(a, b))


def _chunks(hidden, weight, bias, target, ignore_index, grad_scale, row_scale, need_dh, need_dw,
            need_db, chunk, backend):
    """The chunk loop shared by forward and (for reduction="none") backward: per-row losses,
    and grad_scale (or row_scale per row) times the gradients asked for (empty if not)."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = _acc(hidden.dtype)
    need_grad = need_dh or need_dw or need_db
    loss = torch.empty(N, dtype=acc, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    # Weight and bias gradients sum over every chunk: accumulate in fp32 (fp64 for fp64).
    dw = torch.zeros((V, H), dtype=acc, device=hidden.device) if need_dw else None
    db = torch.zeros(V, dtype=acc, device=hidden.device) if need_db else None
    wt = weight.t()
    # The op promises fp32 accumulation on its inputs' own dtype: an enclosing autocast must
    # not recast these matmuls (it would also break the out= product below).
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            h = hidden[s:e]
            logits = torch.addmm(bias, h, wt) if bias is not None else torch.mm(h, wt)
            # The gradient overwrites this chunk's logits: no second (rows, V) buffer.
            loss[s:e] = _rows(FOP, backend, logits, target[s:e], logits if need_grad else None,
                              ignore_index, 0.0, grad_scale)
            if not need_grad:
                continue
            dl = logits
            if row_scale is not None:
                dl.mul_(row_scale[s:e].unsqueeze(1))
            if need_dh:
                torch.mm(dl, weight, out=dh[s:e])
            if need_dw:
                _add_mm(dw, dl.t(), h)
            if need_db:
                db += dl.sum(0, dtype=acc)
    # The sums stay in the accumulation dtype: the caller converts them to the parameters'
    # own dtype (under autocast fp32 parameters: no conversion, no rounding to bf16).
    dw = dw if need_dw else weight.new_empty(0)
    db = db if need_db else weight.new_empty(0)
    return loss, dh, dw, db


def _compute_inputs(compute_dtype, hidden, weight, bias):
    """The tensors the products run on: under autocast (``compute_dtype`` set) fp32 ones are
    cast to it inside the op, so the op's gradients come back in the parameters' own dtype
    straight from the fp32 sums, not through a bf16 copy that autograd then casts back."""
    if compute_dtype is None:
        return hidden, weight, bias

    def cast(t):
        return t.to(compute_dtype) if t is not None and t.dtype == torch.float32 else t

    return cast(hidden), cast(weight), cast(bias)


def _grads_as_inputs(dh, dw, db, hidden, weight, bias, need_dh, need_dw, need_db):
    """Each gradient in its input's dtype (empty where not asked for)."""
    return (dh.to(hidden.dtype) if need_dh else dh,
            dw.to(weight.dtype) if need_dw else dw,
            db.to(bias.dtype) if need_db else db)


def _flce_fwd_impl(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                   ignore_index: int, reduction: str, chunk: int, need_dh: bool, need_dw: bool,
                   need_db: bool, backend: str,
                   compute_dtype: Optional[torch.dtype] = None, defer_scale: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden (N, H), weight (V, H), target (N,) int64 -> reduced loss, for mean/sum the
    gradients asked for, each in its input's dtype (empty tensors otherwise; "none"
    recomputes them in backward), and the 0-dim scale those still need (``defer_scale``, as
    in _ce_fwd_impl: no host sync). ``compute_dtype``: autocast's dtype (_compute_inputs)."""
    n_valid, grad_scale, pending = _scale_plan(FOP, target, weight.shape[0], ignore_index,
                                               reduction, _acc(hidden.dtype), defer_scale)
    store = reduction != "none"
    nh, nw, nb = need_dh and store, need_dw and store, need_db and store
    hc, wc, bc = _compute_inputs(compute_dtype, hidden, weight, bias)
    rows, dh, dw, db = _chunks(hc, wc, bc, target, ignore_index, grad_scale, None, nh, nw, nb,
                               chunk, backend)
    return (_reduce(rows, reduction, n_valid),
            *_grads_as_inputs(dh, dw, db, hidden, weight, bias, nh, nw, nb), pending)


_flce_fwd = torch.library.custom_op("minigpt::fused_linear_cross_entropy_fwd",
                                    mutates_args=())(_flce_fwd_impl)


@_flce_fwd.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, chunk, need_dh, need_dw, need_db,
      backend, compute_dtype=None, defer_scale=False):
    store = reduction != "none"
    shape = (hidden.shape[0],) if reduction == "none" else ()
    loss = hidden.new_empty(shape, dtype=_acc(_compute_inputs(compute_dtype, hidden, weight,
                                                              bias)[0].dtype))
    dh = torch.empty_like(hidden) if need_dh and store else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dw and store else weight.new_empty(0)
    db = torch.empty_like(bias) if need_db and store else weight.new_empty(0)
    return loss, dh, dw, db, hidden.new_empty((), dtype=_acc(hidden.dtype))


def _flce_bwd_impl(dloss: Tensor, hidden: Tensor, weight: Tensor, target: Tensor,
                   bias: Optional[Tensor], ignore_index: int, chunk: int, need_dh: bool,
                   need_dw: bool, need_db: bool, backend: str,
                   compute_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """reduction="none": recompute each chunk and weight row i's gradient by dloss[i]."""
    hc, wc, bc = _compute_inputs(compute_dtype, hidden, weight, bias)
    _, dh, dw, db = _chunks(hc, wc, bc, target, ignore_index, 1.0, dloss, need_dh, need_dw,
                            need_db, chunk, backend)
    return _grads_as_inputs(dh, dw, db, hidden, weight, bias, need_dh, need_dw, need_db)


_flce_bwd = torch.library.custom_op("minigpt::fused_linear_cross_entropy_bwd",
                                    mutates_args=())(_flce_bwd_impl)


@_flce_bwd.register_fake
def _(dloss, hidden, weight, target, bias, ignore_index, chunk, need_dh, need_dw, need_db,
      backend, compute_dtype=None):
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dw else weight.new_empty(0)
    db = torch.empty_like(bias) if need_db else weight.new_empty(0)
    return dh, dw, db


def _flce_setup(ctx, inputs, output):
    (hidden, weight, target, bias, ignore_index, reduction, chunk, ndh, ndw, ndb, backend,
     compute_dtype, *rest) = inputs
    ctx.set_materialize_grads(False)  # no zero tensors of weight's size for the grad outputs
    ctx.reduction, ctx.need = reduction, (ndh, ndw, ndb)
    ctx.defer = bool(rest[0]) if rest else False
    ctx.args = (ignore_index, chunk, ndh, ndw, ndb, backend, compute_dtype)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, target, bias)
    else:
        ctx.save_for_backward(*output[1:])


def _flce_backward(ctx, dloss, _ddh, _ddw, _ddb, _dpending):
    if dloss is None:
        return (None,) * 13
    ndh, ndw, ndb = ctx.need
    if ctx.reduction == "none":
        hidden, weight, target, bias = ctx.saved_tensors
        bwd = bwd_op(ctx, _flce_bwd, _flce_bwd_impl)
        dh, dw, db = bwd(dloss.contiguous(), hidden, weight, target, bias, *ctx.args)
    elif ctx.defer:
        *grads, pending = _saved(ctx)
        wanted = [g for g, n in zip(grads, ctx.need) if n]
        # input positions of hidden, weight and bias
        where = [i for i, n in zip((0, 1, 3), ctx.need) if n]
        scaled = iter(_apply_pending(ctx, wanted, dloss * pending, where))
        dh, dw, db = (next(scaled) if n else g for g, n in zip(grads, ctx.need))
    else:
        dh, dw, db = (_scaled(g, dloss) for g in _saved(ctx)[:3])
    return (dh if ndh else None, dw if ndw else None, None, db if ndb else None,
            None, None, None, None, None, None, None, None, None)


_flce_fwd.register_autograd(_flce_backward, setup_context=_flce_setup)
# Eager mode skips the custom op's costly autograd wrapper (see _eager.py).
_EagerFLCE = eager_function("_EagerFLCE", _flce_fwd_impl, _flce_setup, _flce_backward,
                            nondiff_outputs=(1, 2, 3, 4))


def _autocast_dtype(hidden: Tensor) -> Optional[torch.dtype]:
    """Under autocast the product hidden @ weight.T runs in the autocast dtype, as F.linear's
    would; the loss and the weight gradient's sum over chunks stay fp32 (_chunks). Keeping the
    fp32 product instead made the loss 70% of a GPT-2 training step on an H200 (fp32 GEMMs
    on CUDA cores): benchmarks/results/bench_train_cuda-h200_profile.md. Like autocast, only
    fp32 tensors are cast, inside the op (_compute_inputs): an fp32 weight gets its fp32
    gradient sum as it is."""
    dev = hidden.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor,
                               bias: Optional[Tensor] = None, ignore_index: int = -100,
                               reduction: str = "mean", backend: Optional[str] = None,
                               chunk_size: Optional[int] = None) -> Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` without ever holding the full
    (tokens, V) logits: hidden (..., H), weight (V, H), bias (V,), target (...).

    Under ``torch.autocast`` the matmul runs in the autocast dtype (fp32 inputs are cast, as
    for ``F.linear``); the loss is accumulated in fp32 either way.

    ``chunk_size``: tokens per chunk (default ``default_chunk_size``: chunk logits as large as
    ``hidden``, but at least 1024 tokens (4096 on CUDA) and 16M logits). ``backend`` picks the per-chunk
    cross-entropy kernel, as in ``cross_entropy``.
    """
    _checks.tensor(FOP, "hidden", hidden)
    _checks.tensor(FOP, "weight", weight)
    _checks.nonempty_last_dim(FOP, "hidden", hidden)
    _check_common(FOP, target, reduction, ignore_index)
    ignore_index = int(ignore_index)
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"{FOP}: weight must have shape (V, H) = (V, {H}) with V >= 1 to match "
                         f"hidden's last dimension, got {tuple(weight.shape)}")
    V = weight.shape[0]
    if bias is not None:
        _checks.tensor(FOP, "bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{FOP}: bias must have shape (V,) = ({V},) to match weight, got "
                             f"{tuple(bias.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{FOP}: target must have hidden's shape without the last dimension, "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(target.shape)}")
    _checks.same_device(FOP, hidden=hidden, weight=weight, bias=bias, target=target)
    cdt = _autocast_dtype(hidden)
    named = [(k, t) for k, t in (("hidden", hidden), ("weight", weight), ("bias", bias))
             if t is not None]
    # The dtype each one's products run in: autocast casts fp32 ones (inside the op, once).
    runs_in = {k: cdt if cdt is not None and t.dtype == torch.float32 else t.dtype
               for k, t in named}
    for k, t in named[1:]:
        if runs_in[k] != runs_in["hidden"]:
            raise TypeError(f"{FOP}: {k} has dtype {t.dtype} but hidden has {hidden.dtype}"
                            + (f" (under autocast to {cdt})" if cdt is not None else ""))
    cast_to = cdt if any(t.dtype == torch.float32 for _, t in named) else None
    compute_dtype = runs_in["hidden"]
    if chunk_size is not None and (isinstance(chunk_size, bool)
                                   or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"{FOP}: chunk_size must be a positive int, got {chunk_size!r}")

    be = _backend.resolve(FOP, backend, hidden.device, compute_dtype)
    # Meta tensors (shape inference, a model built on torch.device("meta")) have no values
    # for the chunk loop, whose autocast guard does not take the meta device either; the
    # reference gives the same shape and dtype.
    if target.numel() == 0 or hidden.is_meta:
        # F.cross_entropy takes int64 targets only; int32 is documented here.
        hc, wc, bc = _compute_inputs(cast_to, hidden, weight, bias)
        return reference.fused_linear_cross_entropy(hc, wc, target.long(), bc, ignore_index,
                                                    reduction)
    h2 = hidden.reshape(-1, H).contiguous()
    t2 = target.reshape(-1).to(torch.int64).contiguous()
    N = h2.shape[0]
    chunk = (min(N, int(chunk_size)) if chunk_size is not None
             else default_chunk_size(N, H, V, h2.device.type))
    grad_on = torch.is_grad_enabled()
    w = weight.contiguous()
    fwd = pick(_flce_fwd, _EagerFLCE, _flce_fwd_impl, h2, w, bias)
    loss = fwd(h2, w, t2, bias, int(ignore_index), reduction, int(chunk),
               grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
               grad_on and bias is not None and bias.requires_grad, be, cast_to,
               _defer_scale(h2))[0]
    return loss.reshape(target.shape) if reduction == "none" else loss
