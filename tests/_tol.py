"""Numerical comparison against the reference.

The rule (FlashAttention's): a kernel's error against a float64 truth may be at most twice
the error eager PyTorch (the reference run in the same dtype) makes, plus a small absolute
floor per dtype. In float32 this reduces to ~1e-5-level agreement.
"""
import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def assert_close(out, ref64, ref_lowp, dtype, name="output", floor=None, factor=2.0):
    """out: kernel result; ref64: reference on float64 inputs; ref_lowp: reference in ``dtype``."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != {ref_lowp.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    floor = FLOOR[dtype] if floor is None else floor
    # Scale the floor by the magnitude of the values being compared.
    scale = max(1.0, ref64.abs().max().item())
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lowp.double() - ref64).abs().max().item()
    bound = factor * ref_err + floor * scale
    assert err <= bound, (f"{name}: max error {err:.3e} > bound {bound:.3e} "
                          f"(eager {dtype} error {ref_err:.3e}, floor {floor:.0e} x {scale:.2f})")


def make(shape, dtype, device, noncontig=False, requires_grad=False, scale=1.0):
    """Random normal input. ``noncontig`` returns every other column of a wider tensor (a
    strided view); with ``requires_grad`` that view is a non-leaf, so take its gradient with
    torch.autograd.grad(..., inputs=[t])."""
    if noncontig:
        base = (torch.randn(*shape[:-1], shape[-1] * 2, device=device) * scale).to(dtype)
        base.requires_grad_(requires_grad)
        return base[..., ::2]
    t = (torch.randn(*shape, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def f64(t):
    """A float64 leaf copy of t for the truth run."""
    return t.detach().double().requires_grad_(t.requires_grad)


def assert_rounded_once(y, yf, backend):
    """y is the fp32 output yf rounded to y's dtype. Exactly where the rounding is torch's
    cast of the same fp32 values (the C++/CUDA backends and the reference); within one unit in
    the last place for Triton, whose two kernels (fp32 and 16-bit output) are compiled apart
    (a contraction may differ by an fp32 ulp before rounding), and whose interpreter truncates
    fp32 -> bf16 instead of rounding to nearest."""
    want = yf.to(y.dtype)
    if backend == "triton":
        ulp = torch.finfo(y.dtype).eps * want.float().abs()
        assert ((y.float() - want.float()).abs() <= ulp * 1.0001).all()
    else:
        assert torch.equal(y, want)
