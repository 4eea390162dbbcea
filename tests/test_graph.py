"""A training step as one CUDA graph (minigpt/graph.py): the same steps as eager training, in
bench train's "-graph" variants and ``minigpt train --cuda-graph``. Capture needs a GPU; the
CPU checks what refuses it and the pieces that run everywhere (tensor learning rate in the
checkpoint, the bench's variant choice)."""
import json

import pytest
import torch

from minigpt import checkpoint as ckpt
from minigpt.graph import GraphedStep, check_capturable, set_lr
from minigpt.model import GPT, GPTConfig
from minigpt.train import train
from tests.test_train import corpus, tiny  # noqa: F401  (fixture)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="CUDA graph capture needs a CUDA device")


def _model(dev="cpu", **kw):
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=61, bias=True)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).to(dev)


def test_capturable_needs_cuda():
    m = _model()
    with pytest.raises(ValueError, match="capturable needs CUDA"):
        m.configure_optimizers(0.1, 1e-3, device_type="cpu", capturable=True)
    opt = m.configure_optimizers(0.1, 1e-3)
    with pytest.raises(ValueError, match="CUDA device"):
        check_capturable(m, opt)


def test_trainer_refuses_what_a_graph_cannot_hold(corpus, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="dropout 0"):
        train(tiny(corpus, tmp_path / "a", cuda_graph=True, dropout=0.1))
    with pytest.raises(ValueError, match="GradScaler"):
        train(tiny(corpus, tmp_path / "b", cuda_graph=True, dropout=0.0, dtype="float16"))
    with pytest.raises(ValueError, match="CUDA device"):
        train(tiny(corpus, tmp_path / "c", cuda_graph=True, dropout=0.0, device="cpu"))


def test_tensor_learning_rate_is_saved_as_a_number(tmp_path):
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=torch.tensor(2e-3), foreach=False)
    m(torch.randint(0, 61, (1, 8)), torch.randint(0, 61, (1, 8)))[1].backward()
    opt.step()
    set_lr(opt, 5e-4)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    _, groups = ckpt.optimizer_state(opt)
    assert json.loads(json.dumps(groups))[0]["lr"] == pytest.approx(5e-4)
    plain = torch.optim.AdamW(m.parameters(), lr=1e-3)
    set_lr(plain, 7e-4)
    assert plain.param_groups[0]["lr"] == 7e-4


def test_bench_graph_variants_only_on_cuda():
    from minigpt.bench import bench_train

    with pytest.raises(ValueError, match="need a CUDA device"):
        bench_train("tiny", steps=1, device="cpu", variants="minigpt-graph", plot=False)


# ----------------------------------------------------------------------------------------------
# On a GPU


def _steps(model, opt, batches, graphed: bool, lrs):
    def body(x, y):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        return loss.detach()

    g = GraphedStep(body, opt, warmup=2) if graphed else None
    losses = []
    for (x, y), lr in zip(batches, lrs):
        set_lr(opt, lr)
        if g is not None:
            losses.append(g(x, y).clone())
        else:
            losses.append(body(x, y))
            opt.zero_grad(set_to_none=True)
    return torch.stack(losses), g


@cuda_only
@pytest.mark.parametrize("be", ["triton", "cuda", "torch"])
def test_graphed_steps_match_eager_steps(be, monkeypatch):
    # Eight steps, each with its own batch and learning rate: the captured step (after two
    # warm-up steps) gives the eager run's losses and weights.
    monkeypatch.setenv("MINIGPT_BACKEND", be)
    gen = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(0, 61, (3, 16), generator=gen).cuda() for _ in range(2))
               for _ in range(8)]
    lrs = [1e-3 * (i + 1) for i in range(8)]
    out = {}
    for graphed in (False, True):
        m = _model("cuda")
        opt = m.configure_optimizers(0.1, 1e-3, device_type="cuda", capturable=True)
        losses, g = _steps(m, opt, batches, graphed, lrs)
        out[graphed] = (losses, [p.detach().clone() for p in m.parameters()], g)
    assert out[True][2].graph is not None and out[True][2].calls == 8
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@cuda_only
def test_graphed_step_refuses_another_batch_shape():
    m = _model("cuda")
    opt = m.configure_optimizers(0.1, 1e-3, device_type="cuda", capturable=True)
    # Two warm-up steps, then the capture: the third batch is the one the graph holds.
    batches = [tuple(torch.randint(0, 61, (2, 16)).cuda() for _ in range(2)) for _ in range(3)]
    _, g = _steps(m, opt, batches, True, [1e-3] * 3)
    assert g.graph is not None
    with pytest.raises(ValueError, match="shapes and dtypes"):
        g(*(torch.randint(0, 61, (3, 16)).cuda() for _ in range(2)))


@cuda_only
def test_trainer_cuda_graph_matches_eager(corpus, tmp_path):  # noqa: F811
    kw = dict(dropout=0.0, device="cuda", dtype="float32", max_iters=8, eval_interval=4,
              ckpt_interval=4)
    a = train(tiny(corpus, tmp_path / "eager", **kw))
    b = train(tiny(corpus, tmp_path / "graph", cuda_graph=True, **kw))
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    # Resumes switch the mode either way, and agree: the graph run's checkpoint continued
    # without a graph, the eager run's with one (the learning rate a GPU tensor again).
    more = dict(kw, max_iters=10)
    c = train(tiny(corpus, tmp_path / "graph", cuda_graph=False, **more), resume=True,
              explicit={"max_iters", "cuda_graph"})
    d = train(tiny(corpus, tmp_path / "eager", cuda_graph=True, **more), resume=True,
              explicit={"max_iters", "cuda_graph"})
    assert c["step"] == d["step"] == 10
    assert d["loss"] == pytest.approx(c["loss"], rel=1e-4)
