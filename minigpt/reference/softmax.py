import torch

from minigpt.reference._util import acc


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """True where query i may see key j: ``j <= i + S - T`` (aligned to the end, so a block
    of T new queries after S - T cached keys sees everything before it)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j <= i + (S - T)


def softmax(x, scale=1.0, causal=False):
    """softmax(scale * x) over the last dim. ``causal`` treats the last two dims as (T, S) and
    masks j > i + S - T. A row with every element masked (only when T > S) is all zeros."""
    z = acc(x) * scale
    if causal:
        keep = causal_mask(x.shape[-2], x.shape[-1], x.device)
        z = z.masked_fill(~keep, float("-inf"))
        y = torch.softmax(z, dim=-1)
        y = torch.nan_to_num(y, nan=0.0)  # fully masked rows: 0/0 -> 0
    else:
        y = torch.softmax(z, dim=-1)
    return y.to(x.dtype)
