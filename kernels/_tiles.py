"""Triton helpers shared by the row kernels' backward (layer_norm, rms_norm): the tiles of
ROWS rows a program walks through its slice."""
import triton
import triton.language as tl


@triton.jit
def row_tile(row0, end, M, N, cols, cmask, ROWS: tl.constexpr):
    """Rows row0 .. row0 + ROWS - 1 of a row-major (M, N) tensor, none at or past ``end`` (the
    program's slice) or M: (rows, element offsets, mask)."""
    rows = row0 + tl.arange(0, ROWS)
    valid = (rows < M) & (rows < end)
    return rows, rows.to(tl.int64)[:, None] * N + cols[None, :], valid[:, None] & cmask[None, :]


@triton.jit
def load_tile2(A, B, row0, end, M, N, cols, cmask, ROWS: tl.constexpr):
    """The same tile of two (M, N) tensors, as stored (zeros where masked)."""
    _, off, mask = row_tile(row0, end, M, N, cols, cmask, ROWS)
    return tl.load(A + off, mask=mask, other=0.0), tl.load(B + off, mask=mask, other=0.0)


@triton.jit
def load_tile(A, row0, end, M, N, cols, cmask, ROWS: tl.constexpr):
    """One tile of an (M, N) tensor, as stored (zeros where masked)."""
    _, off, mask = row_tile(row0, end, M, N, cols, cmask, ROWS)
    return tl.load(A + off, mask=mask, other=0.0)


@triton.jit
def load_operands(Hx, DY, DH, row0, end, M, N, cols, cmask, ROWS: tl.constexpr,
                  HAS_DH: tl.constexpr):
    """A backward's input tiles, as stored: h (or x), dy and, with HAS_DH, the residual
    gradient dh (without it, zeros nothing reads)."""
    x, dy = load_tile2(Hx, DY, row0, end, M, N, cols, cmask, ROWS)
    if HAS_DH:
        dh = load_tile(DH, row0, end, M, N, cols, cmask, ROWS)
    else:
        dh = tl.zeros_like(dy)
    return x, dy, dh
