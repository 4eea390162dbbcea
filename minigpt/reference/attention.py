import math

import torch

from minigpt.reference._util import acc
from minigpt.reference.philox import dropout_keep
from minigpt.reference.softmax import causal_mask, masked_softmax_rows


def attention(q, k, v, causal=True, scale=None, dropout_p=0.0, seed=None):
    """Explicit softmax(q k^T * scale) v in float32. q (B, Hq, T, D); k, v (B, Hkv, S, D) with
    Hq a multiple of Hkv (grouped-query attention). Causal is aligned to the end: query i sees
    keys j <= i + S - T. A query that sees no key (T > S) gets zeros.

    ``dropout_p`` > 0: dropout on the probabilities (SDPA's ``dropout_p``), each zeroed with
    probability p and the kept ones scaled by 1/(1-p), with the mask the Triton kernels draw
    from ``seed`` (an int in [0, 2**63); see minigpt/reference/philox.py)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rep = Hq // Hkv
    kf = acc(k).repeat_interleave(rep, dim=1)
    vf = acc(v).repeat_interleave(rep, dim=1)
    s = acc(q) @ kf.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
    p = masked_softmax_rows(s)
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("reference.attention: dropout_p > 0 needs a seed")
        keep = dropout_keep(seed, dropout_p, p.shape, p.device)
        p = torch.where(keep, p, 0.0) * (1.0 / (1.0 - dropout_p))
    return (p @ vf).to(q.dtype)


def _forward_ad_dual(t) -> bool:
    import torch.autograd.forward_ad as fwAD

    return fwAD._current_level >= 0 and fwAD.unpack_dual(t).tangent is not None


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None):
    """One new query per sequence against its cache. q (B, Hq, 1, D); caches (B, Hkv, S_max, D);
    sequence b attends to its first ``cache_seqlens[b]`` keys (the new token's own key and value
    are already written there)."""
    B, Hq, _, D = q.shape
    S_max = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rep = Hq // k_cache.shape[1]
    valid = torch.arange(S_max, device=q.device)[None, :] < cache_seqlens.to(q.device)[:, None]
    # Positions past a sequence's length hold whatever the cache buffer held (torch.empty: NaN
    # or inf too). A -inf score alone does not hide them: p @ v computes 0 * inf = NaN there,
    # and the backward's dq = ds @ k does the same with the keys. Zeroed, they are inert, as
    # in the kernels, which never read past the length. The keys only where q's gradient is
    # wanted (the scores' NaN is masked anyway): a decode step without autograd, the usual
    # one, pays a pass over the values alone.
    hide = ~valid[:, None, :, None]
    kf = acc(k_cache)
    if q.requires_grad or _forward_ad_dual(q):
        kf = kf.masked_fill(hide, 0.0)
    kf = kf.repeat_interleave(rep, dim=1)
    vf = acc(v_cache).masked_fill(hide, 0.0).repeat_interleave(rep, dim=1)
    s = acc(q) @ kf.transpose(-1, -2) * scale  # (B, Hq, 1, S_max)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ vf).to(q.dtype)
