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
    masks j > i + S - T. A row with nothing left (every element -inf or masked, e.g. query rows
    with no key when T > S) is all zeros rather than 0/0; NaN inputs still give NaN."""
    z = acc(x) * scale
    if causal:
        keep = causal_mask(x.shape[-2], x.shape[-1], x.device)
        z = z.masked_fill(~keep, float("-inf"))
    return masked_softmax_rows(z).to(x.dtype)


def masked_softmax_rows(z):
    """torch.softmax over the last dim, with all -inf rows giving zeros (shared with attention).
    Those rows are replaced by zeros before the softmax too, not only after: softmax's NaN
    there would come back in the backward (its gradient reads the output), giving a NaN
    gradient for a row whose output is the constant 0. Their gradient is 0, as the kernels'."""
    empty = torch.isneginf(z).all(-1, keepdim=True)
    y = torch.softmax(z.masked_fill(empty, 0.0), dim=-1)
    return y.masked_fill(empty, 0.0)
