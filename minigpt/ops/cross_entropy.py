"""cross_entropy / fused_linear_cross_entropy: placeholder dispatch (torch backend only)
until the kernel backends land."""
from minigpt import _backend, reference

OP = "cross_entropy"


def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  backend=None):
    _backend.resolve(OP, backend, logits.device, logits.dtype, supported=("torch",))
    return reference.cross_entropy(logits, target, ignore_index, reduction, label_smoothing)


def fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100,
                               reduction="mean", backend=None):
    _backend.resolve("fused_linear_cross_entropy", backend, hidden.device, hidden.dtype,
                     supported=("torch",))
    return reference.fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index,
                                                reduction)
