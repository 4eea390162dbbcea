"""A training step without host syncs: what lets it be captured as one CUDA graph
(minigpt.train's cuda_graph, bench train's "-graph" variants) and keeps the host ahead of
the GPU. On the CPU the reads are caught by name (tests/_sync.py)."""
import contextlib

import pytest
import torch

from minigpt import ops
from minigpt.model import GPT, GPTConfig
from minigpt.train import accumulated_step
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


@pytest.mark.parametrize("be,dev", backend_device_pairs())
def test_accumulated_step_reads_nothing(be, dev, monkeypatch):
    # The step body of bench train and of a CUDA graph: like train's loop it runs the model in
    # no_host_sync, so the plain variants of bench train time the step, not the host's waits.
    # SGD: torch's single-tensor Adam reads its CPU step count (capturable Adam, the graph's,
    # keeps it on the GPU).
    monkeypatch.setenv("MINIGPT_BACKEND", be)
    torch.manual_seed(0)
    model = _model("gpt", dev)
    xs = torch.randint(0, 61, (3, 2, 16), device=dev)
    ys = torch.randint(0, 61, (3, 2, 16), device=dev)
    with torch.no_grad():
        want = torch.stack([model(x, y)[1] for x, y in zip(xs, ys)]).mean()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with forbid_host_sync():
        loss = accumulated_step(model, list(model.parameters()), opt, xs, ys,
                                contextlib.nullcontext, 0.5)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
