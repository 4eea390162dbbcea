"""Convergence: a small model trained 30 steps on our kernels (backend cpu: the C++ ops, fused
linear cross-entropy included) and on the reference ops (backend torch) has the same loss at
every step, in float32; and it learns. Also a transformers Llama patched with
minigpt.patch.apply_to_llama against the same model unpatched."""
import copy
import os

import pytest
import torch

from minigpt.model import GPT, GPTConfig

STEPS = 30
V = 96
BLOCK = 32
BATCH = 4
# Two runs that differ only by float32 rounding inside the ops drift apart slowly through the
# optimizer (measured: <= 3e-7 relative over the 30 steps); a wrong gradient anywhere moves the
# loss by far more than this.
RTOL = 2e-5


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls: threads only add scheduling noise (and on a shared CI box, contention).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _corpus():
    # A learnable stream: a fixed random "vocabulary of phrases" repeated in random order.
    g = torch.Generator().manual_seed(1)
    phrases = torch.randint(0, V, (12, 8), generator=g)
    order = torch.randint(0, 12, (400,), generator=g)
    return phrases[order].reshape(-1)


def _batches():
    data = _corpus()
    g = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        start = torch.randint(0, data.numel() - BLOCK - 1, (BATCH,), generator=g)
        x = torch.stack([data[s:s + BLOCK] for s in start])
        y = torch.stack([data[s + 1:s + BLOCK + 1] for s in start])
        yield x, y


def _train(model, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses = []
    for x, y in _batches():
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_same_curve(ours, ref):
    assert len(ours) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: loss {a:.7f} vs reference {b:.7f}"
    # And the model learned something (the stream is very predictable).
    assert ref[-1] < 0.75 * ref[0], ref


CONFIGS = {
    "gpt": lambda: GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=BLOCK, vocab_size=V),
    "llama": lambda: GPTConfig.llama(n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                     block_size=BLOCK, vocab_size=V, tie_embeddings=False),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_minigpt_same_loss_curve_on_kernels_and_reference(arch, monkeypatch):
    def gpt_loss(model, x, y):
        return model(x, y)[1]  # fused linear cross-entropy from the last hidden state

    curves = {}
    for be in ("cpu", "torch"):
        monkeypatch.setenv("MINIGPT_BACKEND", be)
        torch.manual_seed(0)
        curves[be] = _train(GPT(CONFIGS[arch]()), gpt_loss)
    _assert_same_curve(curves["cpu"], curves["torch"])


def test_patched_transformers_llama_same_loss_curve():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from minigpt.patch import apply_to_llama

    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=BLOCK + 1)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    ours = apply_to_llama(copy.deepcopy(ref), backend="cpu")

    def hf_loss(model, x, y):
        # transformers shifts labels itself: pass the window x with its next token appended.
        ids = torch.cat([x, y[:, -1:]], dim=1)
        return model(ids, labels=ids).loss

    _assert_same_curve(_train(ours.train(), hf_loss), _train(ref.train(), hf_loss))
