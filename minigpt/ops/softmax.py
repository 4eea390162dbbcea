"""softmax: placeholder dispatch (torch backend only) until the kernel backends land."""
from minigpt import _backend, reference

OP = "softmax"


def softmax(x, scale=1.0, causal=False, backend=None):
    _backend.resolve(OP, backend, x.device, x.dtype, supported=("torch",))
    return reference.softmax(x, scale, causal)
