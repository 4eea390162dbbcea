"""Plain eager PyTorch for every op: the numerical truth for the tests and the ``torch``
backend. Everything is computed in float32 (float64 stays float64) and cast back to the
input dtype at the end, which is what the fused kernels promise too.

One file per op, mirroring ``minigpt/ops`` and ``kernels/``.
"""
from minigpt.reference.attention import attention, decode_attention
from minigpt.reference.cross_entropy import cross_entropy, fused_linear_cross_entropy
from minigpt.reference.layer_norm import layer_norm
from minigpt.reference.rms_norm import rms_norm
from minigpt.reference.rope import rope
from minigpt.reference.softmax import softmax
from minigpt.reference.swiglu import swiglu

__all__ = ["attention", "decode_attention", "cross_entropy", "fused_linear_cross_entropy",
           "layer_norm", "rms_norm", "rope", "softmax", "swiglu"]
