"""A training step without host syncs: what lets it be captured as one CUDA graph
(minigpt.train's cuda_graph, bench train's "-graph" variants) and keeps the host ahead of
the GPU. On the CPU the reads are caught by name (tests/_sync.py)."""
import pytest
import torch

from minigpt import ops
from minigpt.model import GPT, GPTConfig
from tests._sync import _Forbid, forbid_host_sync
from tests.conftest import backend_device_pairs


def test_forbid_host_sync_catches_reads():
    x = torch.randn(4)
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0] > 0),
                 lambda: int(x.argmax()), lambda: x[x > 0], lambda: x.nonzero()):
        mode = _Forbid()
        with mode:
            read()
        assert mode.seen, read
    with forbid_host_sync():
        (x * 2).sum()


def test_host_checks_switch():
    x = torch.randn(3)
    assert ops.host_checks(x)
    with ops.no_host_sync():
        assert not ops.host_checks(x)
        with ops.no_host_sync():
            assert not ops.host_checks(x)
        assert not ops.host_checks(x)
    assert ops.host_checks(x)


def _model(kind, dev):
    cfg = (GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=61, bias=True)
           if kind == "gpt" else
           GPTConfig.llama(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16,
                           vocab_size=61))
    return GPT(cfg).to(dev)


@pytest.mark.parametrize("be,dev", backend_device_pairs())
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_training_step_has_no_host_sync(be, dev, kind, monkeypatch):
    # Forward with targets, backward and gradient clipping read no value on the host inside
    # no_host_sync(), and give the gradients of the same step with the checks on.
    monkeypatch.setenv("MINIGPT_BACKEND", be)
    torch.manual_seed(0)
    model = _model(kind, dev)
    x = torch.randint(0, 61, (2, 16), device=dev)
    y = torch.randint(0, 61, (2, 16), device=dev)
    y[0, :3] = -100  # ignored positions: the mean's count is not the number of tokens

    def step():
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        return loss.detach(), norm, [p.grad.clone() for p in model.parameters()]

    loss_ref, norm_ref, grads_ref = step()
    with ops.no_host_sync(), forbid_host_sync():
        loss, norm, grads = step()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm, norm_ref, rtol=1e-6, atol=1e-6)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-7)
