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


@triton.jit
def walk_start(Hx, DY, DH, row0, end, M, N, cols, cmask, ROWS: tl.constexpr,
               HAS_DH: tl.constexpr, PIPELINE: tl.constexpr):
    """What a backward's walk over its tiles carries into its first step (walk_step): with
    PIPELINE the first tile's operands, loaded ahead; else placeholders nothing reads."""
    if PIPELINE:
        x, dy, dh = load_operands(Hx, DY, DH, row0, end, M, N, cols, cmask, ROWS, HAS_DH)
    else:
        x, dy, dh = row0, row0, row0
    return x, dy, dh


@triton.jit
def walk_step(Hx, DY, DH, x_ahead, dy_ahead, dh_ahead, row0, end, M, N, cols, cmask,
              ROWS: tl.constexpr, HAS_DH: tl.constexpr, PIPELINE: tl.constexpr):
    """The tile at row0: its h, dy and dh in fp32, then what the next step gets. With PIPELINE
    the tile was loaded a step ahead and the next one's loads leave now, before this tile's
    reductions wait on each other, so the memory system has work during them (a one-deep
    software pipeline; _util.bwd_pipeline says where)."""
    if PIPELINE:
        x, dy, dh = x_ahead, dy_ahead, dh_ahead
        x_ahead, dy_ahead, dh_ahead = load_operands(Hx, DY, DH, row0 + ROWS, end, M, N, cols,
                                                    cmask, ROWS, HAS_DH)
    else:
        x, dy, dh = load_operands(Hx, DY, DH, row0, end, M, N, cols, cmask, ROWS, HAS_DH)
    return (x.to(tl.float32), dy.to(tl.float32), dh.to(tl.float32), x_ahead, dy_ahead,
            dh_ahead)
