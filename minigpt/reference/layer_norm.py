import torch

from minigpt.reference._util import acc


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None):
    """LayerNorm over the last dim. With ``residual``: ``h = x + residual`` (in the promoted
    dtype, as the unfused model would store it) and returns ``(layer_norm(h), h)``, the
    output in h's dtype."""
    h = x if residual is None else x + residual
    hf = acc(h)
    mean = hf.mean(-1, keepdim=True)
    var = (hf - mean).pow(2).mean(-1, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps) * acc(weight)
    if bias is not None:
        y = y + acc(bias)
    y = y.to(h.dtype)
    return y if residual is None else (y, h)
