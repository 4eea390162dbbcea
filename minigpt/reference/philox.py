"""Triton's counter-based RNG (``tl.rand``: Philox4x32-10) in plain PyTorch integer ops.

The attention kernels draw their dropout mask with ``tl.rand(seed, offset)``, offset the flat
index of each (batch, head, query, key) probability, and never store it: forward and backward
regenerate it. This is the same function on the host, bit for bit (triton/language/random.py
of Triton 3.6), so the reference (the ``torch`` backend) applies the same mask as the kernels
and the tests compare them exactly as without dropout.

What ``tl.rand(seed, offset)`` computes for an int64 ``offset``:
  * counter (c0, c1, c2, c3) = (low 32 bits of offset, high 32 bits, 0, 0); key (k0, k1) =
    (low 32 bits of seed, high 32 bits);
  * ten Philox rounds (below), keeping c0;
  * c0 reinterpreted as int32, x -> x if x >= 0 else -x - 1 (a value in [0, 2**31)), converted
    to float32 and multiplied by float32(4.6566127342e-10), the largest scale that keeps the
    result below 1.

uint32 arithmetic in int64 tensors: a 32 x 32-bit product overflows int64, so each multiply by
a round constant is split into the constant's 16-bit halves (products < 2**48).
"""
import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_N_ROUNDS = 10
_TO_UNIFORM = 4.6566127342e-10  # triton.language.random.uint_to_uniform_float, int32 case


def _mulhilo(const: int, x: torch.Tensor):
    """(high, low) 32-bit halves of const * x, for a uint32 constant and x holding uint32s."""
    lo_part = x * (const & 0xFFFF)           # < 2**48
    u = x * (const >> 16) + (lo_part >> 16)  # < 2**48 + 2**32
    return u >> 16, ((u & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox_uint32(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offsets)``: the first Philox4x32-10 output word for each offset, as
    int64 values in [0, 2**32). ``offsets``: a non-negative integer tensor; ``seed`` an int in
    [0, 2**63), or an int64 tensor holding one (kept a tensor, never read back with .item(), so
    torch.compile traces this without a graph break)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=offsets.device, dtype=torch.int64).reshape(())
    elif not 0 <= int(seed) < 2**63:
        raise ValueError(f"philox: seed must lie in [0, 2**63), got {seed}")
    off = offsets.to(torch.int64)
    c0 = off & _M32
    c1 = (off >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for r in range(_N_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        # Round r's key is the seed's halves plus r times the Weyl constants, mod 2**32.
        c0 = hi_b ^ c1 ^ ((k0 + r * _KEY_A) & _M32)
        c2 = hi_a ^ c3 ^ ((k1 + r * _KEY_B) & _M32)
        c1, c3 = lo_b, lo_a
    return c0


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)``: float32 uniforms in [0, 1), bit for bit."""
    x = philox_uint32(seed, offsets)
    x = torch.where(x >= 2**31, x - 2**32, x)  # the int32 bit pattern
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_TO_UNIFORM, dtype=torch.float32)


def dropout_keep(seed, p: float, shape, device=None) -> torch.Tensor:
    """The attention kernels' keep mask for probabilities of ``shape`` (B, H, T, S): element
    (b, h, i, j) is kept when ``tl.rand(seed, ((b * H + h) * T + i) * S + j) >= p`` (p compared
    in float32, as the kernels receive it)."""
    n = 1
    for s in shape:
        n *= int(s)
    offsets = torch.arange(n, dtype=torch.int64, device=device).view(*shape)
    return philox_uniform(seed, offsets) >= torch.tensor(p, dtype=torch.float32, device=device)
