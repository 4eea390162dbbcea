import torch

from minigpt.reference._util import acc


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(cos, sin, T, position_ids=None):
    """cos/sin broadcastable to (B, 1, T, D). Without position_ids they are (T, D) or (B, T, D)
    already aligned with the queries; with position_ids ((T,) or (B, T)) they are tables
    (L, D) indexed by absolute position, which is how decoding after a cache offsets them."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    if cos.dim() == 2:
        return cos[None, None], sin[None, None]
    return cos[:, None], sin[:, None]


def rope(q, k, cos, sin, position_ids=None):
    """Rotary embeddings in the rotate-half (GPT-NeoX / Hugging Face Llama) layout: q (B, Hq, T,
    D) and k (B, Hk, T, D) rotated by cos/sin of shape (.., T, D) whose halves repeat."""
    c, s = rope_tables(acc(cos), acc(sin), q.shape[-2], position_ids)
    qf, kf = acc(q), acc(k)
    q2 = qf * c + _rotate_half(qf) * s
    k2 = kf * c + _rotate_half(kf) * s
    return q2.to(q.dtype), k2.to(k.dtype)
