"""rope: placeholder dispatch (torch backend only) until the kernel backends land."""
from minigpt import _backend, reference

OP = "rope"


def rope(q, k, cos, sin, position_ids=None, backend=None):
    _backend.resolve(OP, backend, q.device, q.dtype, supported=("torch",))
    return reference.rope(q, k, cos, sin, position_ids)
