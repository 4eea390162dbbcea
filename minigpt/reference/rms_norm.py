import torch

from minigpt.reference._util import acc


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``. With ``residual``,
    normalizes ``h = x + residual`` and returns ``(rms_norm(h), h)``."""
    h = x if residual is None else x + residual
    hf = acc(h)
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * acc(weight)
    y = y.to(h.dtype)
    return y if residual is None else (y, h)
