import torch.nn.functional as F

from minigpt.reference._util import acc


def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Cross-entropy of logits (..., V) against integer targets (...), in float32; the mean is
    over targets that are not ``ignore_index``."""
    V = logits.shape[-1]
    loss = F.cross_entropy(acc(logits).reshape(-1, V), target.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss


def fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100,
                               reduction="mean"):
    """cross_entropy(hidden @ weight^T + bias, target): hidden (..., H), weight (V, H)."""
    logits = acc(hidden) @ acc(weight).t()
    if bias is not None:
        logits = logits + acc(bias)
    return cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
