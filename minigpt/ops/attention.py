"""attention / decode_attention: placeholder dispatch (torch backend only) until the kernel
backends land."""
from minigpt import _backend, reference

OP = "attention"


def attention(q, k, v, causal=True, scale=None, backend=None):
    _backend.resolve(OP, backend, q.device, q.dtype, supported=("torch",))
    return reference.attention(q, k, v, causal, scale)


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, backend=None):
    _backend.resolve("decode_attention", backend, q.device, q.dtype, supported=("torch",))
    return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)
