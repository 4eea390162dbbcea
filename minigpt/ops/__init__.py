"""The public fused-op API. Other projects import from here:

    from minigpt.ops import layer_norm, softmax, attention

Each op lives in its own module here, which is its single dispatch point: it checks the
inputs, picks a backend (``backend=`` argument, else ``$MINIGPT_BACKEND``, else the best one
for the tensor's device) and calls the Triton kernel (kernels/), the C++/CUDA kernel
(csrc/, as ``minigpt._C``) or the eager reference (minigpt.reference). Kernel backends are
registered as ``torch.library`` custom ops with fake (meta) implementations and autograd, so
they work under ``torch.compile(fullgraph=True)``.
"""
from minigpt._backend import BACKENDS, BackendUnavailableError, available_backends
from minigpt.ops.layer_norm import layer_norm

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "layer_norm"]
