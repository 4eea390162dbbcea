"""swiglu: placeholder dispatch (torch backend only) until the kernel backends land."""
from minigpt import _backend, reference

OP = "swiglu"


def swiglu(gate, up, backend=None):
    _backend.resolve(OP, backend, gate.device, gate.dtype, supported=("torch",))
    return reference.swiglu(gate, up)
