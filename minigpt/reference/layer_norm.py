import torch

from minigpt.reference._util import acc


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None):
    """LayerNorm over the last dim. With ``residual``: ``h = x + residual`` (rounded to x's
    dtype, as the unfused model would store it) and returns ``(layer_norm(h), h)``."""
    h = x if residual is None else x + residual
    hf = acc(h)
    mean = hf.mean(-1, keepdim=True)
    var = (hf - mean).pow(2).mean(-1, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps) * acc(weight)
    if bias is not None:
        y = y + acc(bias)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)
