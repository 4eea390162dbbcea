"""Cross-entropy over rows of logits in Triton (Liger-Kernel's scheme): one program per row.

Pass 1 streams the row in BLOCK-sized chunks keeping a running max and running sum of exp
(online logsumexp), so the softmax never exists in memory. Pass 2 (only when a gradient is
wanted) writes ``grad_scale * (softmax - eps / V - (1 - eps) [j == t])`` into ``grad``, which
may be the logits tensor itself: each element is loaded before it is overwritten, and x_t is
read in pass 1. Ignored rows get loss 0 and a zero gradient. Rows wider than one block run on
a persistent grid (cross_entropy_fwd says why).
"""
import torch
import triton
import triton.language as tl

from minigpt.kernels._util import next_pow2, num_programs

MAX_BLOCK = 4096
PERSISTENT_PER_SM = 2
# Blocks of a wide row in flight per program (tl.range's software pipeline: cp.async into
# shared memory, 16 KB a program at BLOCK 4096 in bf16, 64 registers at 16 warps, no spills on
# sm_90). Without it each BLOCK waited for its load, then for two block-wide reductions, before
# the next load left: GPT-2's 4096 x 50304 bf16 chunk took 535 us on the H100, about 1.6 TB/s.
STAGES = 3


@triton.jit
def _ce_fwd_kernel(X, T, G, Loss, M, V, ignore_index, eps, grad_scale,
                   HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    # Rows pid, pid + programs, ...: one each when the grid is M, several when it is persistent.
    pid = tl.program_id(0)
    row = pid.to(tl.int64)  # carried in int64: row * V passes 2**31 for GPT-2's logits
    for _ in range(pid, M, tl.num_programs(0)):
        Xr = X + row * V
        Gr = G + row * V
        t = tl.load(T + row)
        # Out-of-range targets are rejected in Python before launching (unless host checks are
        # off); treat them like ignored rows here (loss NaN) rather than read outside the row.
        skip = (t == ignore_index) | (t < 0) | (t >= V)
        if skip:
            if t == ignore_index:
                tl.store(Loss + row, 0.0)
            else:
                tl.store(Loss + row, float("nan"))
            if HAS_GRAD:
                for off in range(0, V, BLOCK):
                    cols = off + tl.arange(0, BLOCK)
                    tl.store(Gr + cols,
                             tl.zeros([BLOCK], dtype=tl.float32).to(G.dtype.element_ty),
                             mask=cols < V)
        else:
            xt = tl.load(Xr + t).to(tl.float32)
            # The smoothing term's sum of logits is taken as sum(x - x_t): sum(x) overflowed at
            # logits near the fp32 max (and m - sum(x) / V cancelled away all precision at any
            # large common offset), where the reference's sum(x - lse) gives log V. A masked
            # target (x_t = -inf) would make x_t - x_t NaN; its loss is +inf either way.
            shift = tl.where((xt == xt) & (tl.abs(xt) != float("inf")), xt, 0.0)
            m = float("-inf")
            d = 0.0
            sx = 0.0
            for off in tl.range(0, V, BLOCK, num_stages=STAGES):
                cols = off + tl.arange(0, BLOCK)
                mask = cols < V
                x = tl.load(Xr + cols, mask=mask, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                # exp(m - m_new) is exp(-inf) = 0 on the first block; masked columns add
                # exp(-inf).
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
                sx += tl.sum(tl.where(mask, x - shift, 0.0), axis=0)
            # Everything relative to the max m: x - m is exact, where x - lse would lose the low
            # bits of large logits. Without smoothing the sum of logits is unused (and -inf
            # logits, i.e. masked classes, would turn 0 * sx into NaN).
            logd = tl.log(d)
            smooth_term = tl.where(eps > 0, eps * (((m - shift) - sx / V) + logd), 0.0)
            tl.store(Loss + row, (1.0 - eps) * ((m - xt) + logd) + smooth_term)
            if HAS_GRAD:
                smooth = eps / V
                # Loads run ahead of the stores: of later columns, so in place (G is X) each
                # element is still read before it is written.
                for off in tl.range(0, V, BLOCK, num_stages=STAGES):
                    cols = off + tl.arange(0, BLOCK)
                    mask = cols < V
                    x = tl.load(Xr + cols, mask=mask, other=0.0).to(tl.float32)
                    g = tl.exp((x - m) - logd) - smooth
                    g = tl.where(cols == t, g - (1.0 - eps), g)
                    tl.store(Gr + cols, (g * grad_scale).to(G.dtype.element_ty), mask=mask)
        row += tl.num_programs(0)


def cross_entropy_fwd(logits, target, grad, ignore_index, label_smoothing, grad_scale):
    """logits (M, V) contiguous; target (M,) int64; grad None, a (M, V) buffer, or logits itself.
    -> per-row loss (M,) fp32; fills grad with grad_scale * dloss_i/dlogits."""
    M, V = logits.shape
    loss = torch.empty(M, dtype=torch.float32, device=logits.device)
    if M == 0:
        return loss
    BLOCK = min(next_pow2(V), MAX_BLOCK)
    # A row wider than one block is read twice (the online logsumexp, then the gradient): the
    # second read should come from L2. With a program per row, as many rows are in flight as
    # fit on the SMs (4 of 16 warps each on an H100: 528 rows, 53 MB at GPT-2's 50304 bf16
    # columns, more than the 50 MB L2); two persistent programs an SM keep half that in flight.
    grid = num_programs(logits.device, M, per_sm=PERSISTENT_PER_SM) if V > BLOCK else M
    _ce_fwd_kernel[(grid,)](
        logits, target, grad if grad is not None else logits, loss, M, V, int(ignore_index),
        float(label_smoothing), float(grad_scale), HAS_GRAD=grad is not None, BLOCK=BLOCK,
        STAGES=STAGES if V > BLOCK else 1, num_warps=min(max(BLOCK // 256, 1), 16))
    return loss
