import torch.nn.functional as F

from minigpt.reference._util import acc


def swiglu(gate, up):
    """silu(gate) * up, computed in float32."""
    return (F.silu(acc(gate)) * acc(up)).to(gate.dtype)
