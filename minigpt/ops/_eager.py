"""An eager-mode twin of a custom op's autograd.

Every kernel op is a ``torch.library`` custom op with a registered autograd formula, which is
what lets ``torch.compile`` treat it as one opaque node. In plain eager mode that wrapper is
expensive: on a 4096 x 1024 LayerNorm its generated autograd function cost ~0.5 ms on top of
a 0.6 ms kernel (measured on the 2-core CPU, torch 2.13). So outside compilation an op calls
the same forward, ``setup_context`` and ``backward`` through a plain ``torch.autograd.Function``
made here; under ``torch.compile`` (``torch.compiler.is_compiling()``) it calls the custom op.
Both paths run the same code, so the tests of one are the tests of the other.

When no gradient can be needed (``torch.no_grad``, inference mode, or no input that requires
grad) even the autograd.Function is pure overhead: ``pick`` hands back the bare forward. A
SmolLM2 decode step makes ~150 op calls, so ~10 us per call is ~1.5 ms per token.
"""
import torch
import torch.autograd.forward_ad as _forward_ad

from minigpt.ops._checks import functorch_level as _functorch_level


def eager_function(name, forward, setup_context, backward, nondiff_outputs=(),
                   differentiable_backward=False, nondiff_unless=None):
    """forward(*inputs) -> tuple of outputs; setup_context(ctx, inputs, output) and
    backward(ctx, *grads) as given to ``register_autograd``. ``nondiff_outputs``: indices of
    outputs that are not differentiable (saved statistics). ``nondiff_unless``: {output index:
    input indices}, an output that is differentiable only when one of those inputs needs a
    gradient (the fused norms' h = x + residual: a weight that needs one had made h need one,
    and a backward through h alone gave the weight a zero .grad instead of none).

    A backward made of kernel calls records no graph of its own: with create_graph=True its
    gradients came back as constants, and a second derivative silently lost this op's term
    (torch's once_differentiable would not help: its error node hangs off detached copies,
    so a derivative through the op's saved tensors still skips it). Such a backward refuses
    create_graph. ``differentiable_backward``: the backward is itself made of differentiable
    ops (rope's calls rope)."""

    def fwd(ctx, *inputs):
        ctx.minigpt_eager = True
        out = forward(*inputs)
        setup_context(ctx, inputs, out)
        nondiff = [out[i] for i in nondiff_outputs]
        for i, deps in (nondiff_unless or {}).items():
            if (not any(ctx.needs_input_grad[j] for j in deps)
                    and not any(out[i] is t for t in inputs)):
                nondiff.append(out[i])
        ctx.mark_non_differentiable(*nondiff)
        return out

    op = name.removeprefix("_Eager")

    def once(ctx, *grads):
        if torch.is_grad_enabled():  # backward(create_graph=True): grad mode is on here
            raise RuntimeError(f"{op}: the kernel backends compute first derivatives only; "
                               "for create_graph=True (second derivatives) use backend='torch'")
        return backward(ctx, *grads)

    bwd = backward if differentiable_backward else once
    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def bwd_op(ctx, custom_op, impl):
    """What a shared ``backward`` calls for the op's backward kernel: its Python body ``impl``
    when the eager twin saved ``ctx`` (the backward custom op's dispatch costs ~20 us a call,
    four times a small CPU LayerNorm backward), the custom op ``custom_op`` when the registered
    autograd did (torch.compile traces it there with fake tensors, which only the custom op's
    ``register_fake`` can take)."""
    return impl if getattr(ctx, "minigpt_eager", False) else custom_op


if hasattr(torch.compiler, "_compile_session_context"):
    def is_compiling() -> bool:
        return torch.compiler.is_compiling()
else:
    # Older torch (2.5): torch.compiler.is_compiling() is True only while Dynamo traces Python,
    # not while AOTAutograd traces a custom op's registered backward with fake tensors (newer
    # torch sets it for the whole compile session). There, e.g. ``bool(dloss == 1)`` would raise
    # DataDependentOutputException; Dynamo's TracingContext is set for the whole compile.
    # (Dynamo folds torch.compiler.is_compiling() to True, so it never traces try_get.)
    from torch._guards import TracingContext as _TracingContext

    def is_compiling() -> bool:
        return torch.compiler.is_compiling() or _TracingContext.try_get() is not None


def leaf_backed(t) -> bool:
    """``t``, or the tensor it is a view of, is a leaf that requires grad: backward's tensor
    for it can become that leaf's ``.grad`` as is (autograd's AccumulateGrad keeps a gradient
    no one else holds rather than copying it), views included. Under torch.compile every
    graph input counts as a leaf here, intermediates do not."""
    if t is None:
        return False
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


# Backward nodes whose output is their incoming gradient or a view of it: what passes through
# them to a leaf's AccumulateGrad arrives there as (a view of) the buffer a backward handed out.
VIEW_NODES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                        "TransposeBackward0", "TransposeBackward1", "TBackward0",
                        "PermuteBackward0", "SqueezeBackward0", "SqueezeBackward1",
                        "SqueezeBackward2", "UnsqueezeBackward0", "AliasBackward0"})


def leaf_grad_stored(ctx, i):
    """Whether the running backward adds input ``i``'s gradient from this backward (``ctx``:
    an autograd.Function's backward node) to a leaf's .grad, past view nodes: True; False
    under torch.autograd.grad (which captures it instead) or for a leaf the backward leaves
    out (``backward(inputs=...)``); None where it does not reach a leaf through views only."""
    nexts = getattr(ctx, "next_functions", ())
    node = nexts[i][0] if i < len(nexts) else None
    while node is not None and type(node).__name__ in VIEW_NODES:
        node = node.next_functions[0][0] if node.next_functions else None
    if node is None or type(node).__name__ != "AccumulateGrad":
        return None
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # "... currently running autograd.grad()": captured, not stored
        return False


def split_now(ctx, x_index, residual_index) -> bool:
    """Whether a fused norm's backward must write x's gradient into a buffer of its own, apart
    from the residual's (ctx.split_grads, set where both are leaves, leaf_backed): only where
    this backward stores both into .grad. Under torch.autograd.grad, or where either one is
    not stored, x and the residual get the same tensor, as eager ``x + residual`` gives them
    (the second store took an H100's 16384 x 8192 add + LayerNorm fwd+bwd, Triton bf16, from
    0.81 to 0.93 ms).
    Where a path to a leaf is not plain views, or while torch.compile traces (the engine is
    not running), it splits: a store too many rather than two .grad that share memory."""
    if not ctx.split_grads:
        return False
    if not getattr(ctx, "minigpt_eager", False):
        return True
    return all(leaf_grad_stored(ctx, i) is not False for i in (x_index, residual_index))


def x_grad(ctx, dx, dx_x, split):
    """A fused norm's gradient for x: dx itself, which is also the residual's, unless x is
    narrower than h or both are leaves whose .grad this backward stores (``split``,
    split_now): their .grad would then be two views of one buffer, and the next accumulation
    into either (a second micro-batch) would add to both. In those cases the backward kernel
    wrote x's gradient into a tensor of its own, dx_x (one more store in the kernel: a clone
    here read dx back and wrote it again: +25% on the H100's 16384 x 8192 add + LayerNorm
    fwd+bwd)."""
    return dx_x if (ctx.x_dtype != dx.dtype or split) else dx


def x_grad_fake(h, x_dtype, split):
    """The fused norm backward's x gradient buffer (dx_x of x_grad) as the kernels return it:
    in x's dtype where that is narrower than h's or with ``split``, else empty."""
    own = x_dtype != h.dtype or split
    return torch.empty_like(h, dtype=x_dtype) if own else h.new_empty(0)


def pick(custom_op, eager, forward, *inputs):
    """What to call for one op invocation: the custom op while torch.compile traces, the
    autograd.Function ``eager`` when some tensor in ``inputs`` needs a gradient, else the bare
    ``forward``."""
    if torch.compiler.is_compiling():
        return custom_op
    if _forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): rare, checked fully
        _refuse_dual(inputs)
    if _functorch_level() is not None:  # ~0.1 us: under torch.func.grad / vmap / jacrev
        raise NotImplementedError(
            "minigpt's kernel backends do not run under torch.func transforms (grad, vmap, "
            "jacrev, jvp): their autograd is a plain autograd.Function around kernels that "
            "take real tensors; use backend='torch' (or MINIGPT_BACKEND=torch) there")
    if torch.is_grad_enabled():
        for t in inputs:
            if t is not None and t.requires_grad:
                return eager.apply
    return forward


def transformed(*inputs) -> bool:
    """Whether this call runs under a torch.func transform or some tensor in ``inputs`` is a
    forward-AD dual tensor: what no kernel can serve (they take real tensors and have no jvp
    rule). ``pick`` refuses it; an op that runs its differentiable reference whenever a
    derivative is wanted (decode_attention) runs it here too."""
    if _functorch_level() is not None:
        return True
    return _forward_ad._current_level >= 0 and _has_dual(inputs)


def _has_dual(inputs) -> bool:
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in inputs)


def _refuse_dual(inputs):
    # The kernels have no forward-mode (jvp) rule: the bare forward dropped a dual input's
    # tangent without a word.
    if _has_dual(inputs):
        raise NotImplementedError(
            "minigpt's kernel backends have no forward-mode AD (jvp) rule; use "
            "backend='torch' (or MINIGPT_BACKEND=torch) for dual tensors")


# Argument preparation without the no-op calls: ``t.to(dtype)`` and ``t.contiguous()`` on a
# tensor that already fits still cost ~1 us each through the binding, a few percent of a
# 4096 x 1024 LayerNorm on the CPU and of every op in a decode step.

def rows(t, n: int):
    """``t`` as a contiguous (rows, n) matrix (a view when it already is one)."""
    if t.dim() == 2 and t.is_contiguous():
        return t
    return t.reshape(-1, n).contiguous()


def as_acc(t, dtype):
    """``t`` contiguous in the accumulation ``dtype``."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(dtype).contiguous()


def norm_param(t, acc, backend, native=False):
    """A norm's weight or bias as its ``backend``'s kernels take it. The C++ kernels take the
    accumulation dtype ``acc`` (fp32; fp64 for fp64 x): a bf16 parameter is cast to it on
    every call (autograd casts the gradient back). Triton reads fp32, bf16 and fp16
    parameters as they are, in fp32, and returns their gradients in their own dtype: no cast
    kernels around a 16-bit model's norms. The CUDA kernels do that too where ``native``
    (native_norm_params: the parameters in the rows' 16-bit dtype)."""
    if (native or backend == "triton") and acc == torch.float32 and t.dtype in (
            torch.float32, torch.bfloat16, torch.float16):
        return t if t.is_contiguous() else t.contiguous()
    return as_acc(t, acc)


def native_norm_params(backend, rows_dtype, *params):
    """Whether the CUDA norm kernels read ``params`` (None: absent) as they are: 16-bit rows
    and every parameter in their dtype. Else they are cast to fp32."""
    return (backend == "cuda" and rows_dtype in (torch.bfloat16, torch.float16)
            and all(p is None or p.dtype == rows_dtype for p in params))


def shaped(t, shape):
    return t if t.shape == shape else t.reshape(shape)


def h_dtype(x, residual):
    """The dtype of a norm's ``h = x + residual`` (and of its output): PyTorch's promotion of
    the two, e.g. fp32 for a bf16 branch added to an fp32 residual stream."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def norm_dtypes(x, residual, out_dtype):
    """(h's dtype, the output dtype to ask the kernels for: None when it is h's anyway)."""
    hd = h_dtype(x, residual)
    return hd, (None if out_dtype == hd else out_dtype)


def kernel_inputs(x, residual, backend):
    """``x`` and ``residual`` as a norm kernel of ``backend`` takes them. The C++ and CUDA
    kernels take one element type: both are cast to h's dtype (differentiable casts).
    Triton's take each tensor in its own dtype, so the bf16 branch of an autocast model is read
    as is instead of first copied to fp32 (forward) and back (backward)."""
    if residual is None or residual.dtype == x.dtype or backend == "triton":
        return x, residual
    hd = h_dtype(x, residual)
    return x.to(hd), residual.to(hd)


def cast_output(out, dtype):
    """A norm's result (``y`` or ``(y, h)``) with ``y`` in ``dtype`` (None: as it is)."""
    if dtype is None:
        return out
    if isinstance(out, tuple):
        return (out[0].to(dtype),) + tuple(out[1:])
    return out.to(dtype)
