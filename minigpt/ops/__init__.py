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
from minigpt.ops._checks import host_checks, no_host_sync
from minigpt.ops.attention import attention, attention_qkv, decode_attention
from minigpt.ops.cross_entropy import cross_entropy, fused_linear_cross_entropy
from minigpt.ops.layer_norm import layer_norm
from minigpt.ops.rms_norm import rms_norm
from minigpt.ops.rope import rope
from minigpt.ops.softmax import softmax
from minigpt.ops.swiglu import swiglu

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "attention",
           "attention_qkv",
           "decode_attention", "cross_entropy", "fused_linear_cross_entropy", "layer_norm",
           "rms_norm", "rope", "softmax", "swiglu", "no_host_sync", "host_checks"]
