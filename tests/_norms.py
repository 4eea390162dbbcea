"""Checks shared by the layer_norm and rms_norm tests: the dtype behaviour both norms have
(a residual of another dtype, out_dtype). ``norm(x, w, b, **kw)`` calls the op under test
(``b`` is None for rms_norm), ``ref(x, w, b, **kw)`` its reference."""
import pytest
import torch

from tests._tol import assert_rounded_once

GRAD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def check_mixed_residual(norm, ref, be, dev, xd, rd, N, bias):
    # An autocast model adds its bf16 branch to the fp32 residual stream: h = x + residual in
    # the promoted dtype (fp32 here, exactly as the unfused add), the output in h's dtype,
    # x's gradient in x's dtype and the residual's in its own.
    g = torch.Generator().manual_seed(N)
    x = torch.randn(5, N, generator=g).to(device=dev, dtype=xd).requires_grad_()
    r = torch.randn(5, N, generator=g).to(device=dev, dtype=rd).requires_grad_()
    w = (torch.rand(N, generator=g) + 0.5).to(dev).requires_grad_()
    b = torch.randn(N, generator=g).to(dev).requires_grad_() if bias else None
    y, h = norm(x, w, b, residual=r, backend=be)
    assert y.dtype == h.dtype == torch.float32
    assert torch.equal(h, x.float() + r.float())
    dy, dh = torch.randn(5, N, generator=g).to(dev), torch.randn(5, N, generator=g).to(dev)
    torch.autograd.backward([y, h], [dy, dh])
    params = [t for t in (x, r, w, b) if t is not None]
    p64 = [t.detach().double().requires_grad_() for t in params]
    x64, r64, w64 = p64[:3]
    b64 = p64[3] if bias else None
    y64, h64 = ref(x64, w64, b64, residual=r64)
    torch.autograd.backward([y64, h64], [dy.double(), dh.double()])
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    assert x.grad.dtype == xd and r.grad.dtype == rd
    if rd == torch.float32:
        # Both are the one dx: x's is the residual's rounded once (the Triton LayerNorm writes
        # it from the kernel, the other paths cast).
        assert_rounded_once(x.grad, r.grad, be)
    # x's gradient is the fp32 one rounded once to x's dtype; the residual's stays fp32 where
    # the residual is fp32.
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=GRAD_TOL[xd] * 4,
                               rtol=GRAD_TOL[xd])
    torch.testing.assert_close(r.grad.double(), r64.grad, atol=GRAD_TOL[rd] * 4,
                               rtol=GRAD_TOL[rd])
    for t, t64 in zip(params[2:], p64[2:]):
        torch.testing.assert_close(t.grad.double(), t64.grad, atol=1e-4, rtol=1e-4)


def check_out_dtype(norm, be, dev, residual, out_dtype, seed, bad_out_dtype):
    # out_dtype: the output written in that dtype, the same values the fp32 output rounds to
    # (what autocast's cast before the next matmul gives); h keeps its dtype; the gradient
    # arrives in out_dtype and flows as the fp32 one would, to within that rounding.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 40, generator=g).to(dev).requires_grad_()
    r = torch.randn(6, 40, generator=g).to(dev).requires_grad_() if residual else None
    w = (torch.rand(40, generator=g) + 0.5).to(dev).requires_grad_()
    out = norm(x, w, None, residual=r, backend=be, out_dtype=out_dtype)
    ref = norm(x, w, None, residual=r, backend=be)
    y, yf = (out[0], ref[0]) if residual else (out, ref)
    assert y.dtype == out_dtype and yf.dtype == torch.float32
    assert_rounded_once(y, yf, be)
    if residual:
        assert out[1].dtype == torch.float32 and torch.equal(out[1], ref[1])
    dy = torch.randn(6, 40, generator=g).to(dev)
    gx, gw = torch.autograd.grad(y, [x, w], dy.to(out_dtype))
    gx_f, gw_f = torch.autograd.grad(yf, [x, w], dy.to(out_dtype).float())
    torch.testing.assert_close(gx, gx_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, gw_f, atol=1e-5, rtol=1e-5)
    assert norm(x, w, None, out_dtype=torch.float32, backend=be).dtype == torch.float32
    with pytest.raises(TypeError, match="out_dtype"):
        norm(x, w, None, out_dtype=bad_out_dtype, backend=be)


def check_only_h_used(norm, be, dev, bias):
    # Only h = x + residual takes part in the loss, not the normalized output (whose gradient
    # autograd then leaves undefined rather than zero-filled): x and the residual get h's
    # gradient, the weight and bias zeros.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 24, generator=g).to(dev).requires_grad_()
    r = torch.randn(4, 24, generator=g).to(dev).requires_grad_()
    w = (torch.rand(24, generator=g) + 0.5).to(dev).requires_grad_()
    b = torch.randn(24, generator=g).to(dev).requires_grad_() if bias else None
    y, h = norm(x, w, b, residual=r, backend=be)
    dh = torch.randn(4, 24, generator=g).to(dev)
    params = [t for t in (x, r, w, b) if t is not None]
    # (the reference's h is a plain add, which leaves w and b out of its graph: None there)
    grads = torch.autograd.grad(h, params, dh, allow_unused=True)
    assert torch.equal(grads[0], dh) and torch.equal(grads[1], dh)
    for gr in grads[2:]:
        assert gr is None or torch.equal(gr, torch.zeros_like(gr))
    y, h = norm(x, w, b, residual=r, backend=be)
    (y.sum() * 0 + h.sum()).backward()  # both used; y's gradient is zeros, h's ones
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(r.grad, torch.ones_like(r))
    # Only the weight (and bias) need a gradient: h = x + residual needs none, as the
    # reference's plain add (the kernel backends had tied h to the op's graph, and a backward
    # through h alone gave the weight a zero .grad)
    y, h = norm(x.detach(), w, b, residual=r.detach(), backend=be)
    assert y.requires_grad and not h.requires_grad and h.grad_fn is None


def check_cpp_refuses_16bit_weights(fwd, bwd):
    """The C++ CPU kernels read fp32 weights (the ops cast others for them; only the CUDA
    kernels read 16-bit ones): the extension's own check names the dtype rather than reading
    bf16 bits as floats. ``fwd(C, x, w)``, ``bwd(C, x, w)`` call its entry points."""
    from minigpt import _backend
    try:
        C = _backend.extension()
    except _backend.BackendUnavailableError as e:
        pytest.skip(str(e))
    x, w = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    for call in (fwd, bwd):
        with pytest.raises(RuntimeError, match="accumulation dtype.*BFloat16"):
            call(C, x, w)
