"""rms_norm: placeholder dispatch (torch backend only) until the kernel backends land."""
from minigpt import _backend, reference

OP = "rms_norm"


def rms_norm(x, weight, eps=1e-6, residual=None, backend=None):
    _backend.resolve(OP, backend, x.device, x.dtype, supported=("torch",))
    return reference.rms_norm(x, weight, eps, residual)
