"""Scalar arguments of every op (eps, scale, dropout_p, label_smoothing, ignore_index,
chunk_size) as numpy scalars - what a config read with numpy or a value taken from an array
gives - act exactly as the Python numbers (they were refused as "not a finite number"), on
every backend."""
import numpy as np
import pytest
import torch

from minigpt import ops
from tests.conftest import backend_device_pairs


@pytest.mark.parametrize("be,dev", backend_device_pairs())
def test_numpy_scalars_act_as_python_numbers(be, dev):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=g).to(dev)
    w = torch.randn(16, generator=g).to(dev)
    same = torch.testing.assert_close
    same(ops.layer_norm(x, w, w, eps=np.float32(1e-3), backend=be),
         ops.layer_norm(x, w, w, eps=1e-3, backend=be), rtol=0, atol=0)
    same(ops.rms_norm(x, w, eps=np.float64(1e-3), backend=be),
         ops.rms_norm(x, w, eps=1e-3, backend=be), rtol=0, atol=0)
    same(ops.softmax(x, scale=np.float32(0.5), backend=be),
         ops.softmax(x, scale=0.5, backend=be), rtol=0, atol=0)
    q = torch.randn(1, 2, 5, 16, generator=g).to(dev)
    same(ops.attention(q, q, q, scale=np.float32(0.25), dropout_p=np.float64(0.0), backend=be),
         ops.attention(q, q, q, scale=0.25, dropout_p=0.0, backend=be), rtol=0, atol=0)
    logits = x.reshape(-1, 16)
    t = torch.randint(0, 16, (21,), generator=g).to(dev)
    t[::4] = 3
    same(ops.cross_entropy(logits, t, ignore_index=np.int64(3), label_smoothing=np.float32(0.25),
                           backend=be),
         ops.cross_entropy(logits, t, ignore_index=3, label_smoothing=0.25, backend=be),
         rtol=0, atol=0)
    W = torch.randn(16, 16, generator=g).to(dev)
    same(ops.fused_linear_cross_entropy(logits, W, t, ignore_index=np.int32(3),
                                        chunk_size=np.int64(8), backend=be),
         ops.fused_linear_cross_entropy(logits, W, t, ignore_index=3, chunk_size=8, backend=be),
         rtol=0, atol=0)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm(x, w, eps=np.float32("nan"), backend=be)
    with pytest.raises((TypeError, ValueError), match="ignore_index"):
        ops.cross_entropy(logits, t, ignore_index=np.float64(3.0), backend=be)
