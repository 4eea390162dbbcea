"""The library used as a server or a research script uses it: calls overlapping in threads,
environment variables as Triton reads them, and a library call that leaves the caller's
process (its environment, its random generators, a shared model's mode) as it found it."""
import io
import os
import subprocess
import sys
import threading

import pytest
import torch

from minigpt import _backend
from minigpt import checkpoint as ckpt
from minigpt.model import GPT, GPTConfig
from minigpt.sampling import generate, sample_checkpoint
from minigpt.tokenizer import CharTokenizer
from tests.conftest import skip_if_triton_refused

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
WAIT = 60  # seconds a thread waits for the other before the test gives up on it


def _wait(event, what):
    assert event.wait(WAIT), f"timed out waiting for {what}"


def _tiny_gpt(vocab, dropout=0.0):
    torch.manual_seed(3)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=vocab,
                      dropout=dropout))
    with torch.no_grad():  # larger weights than the init: varied, non-uniform predictions
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return m


def _in_threads(a, b):
    """Run a() and b() in two threads; re-raise the first error either raised."""
    errors = []

    def run(f):
        try:
            f()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f,), daemon=True) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------------------------
# TRITON_INTERPRET: what Triton takes for "on" is what the kernels and the dispatch take


@skip_if_triton_refused
def test_triton_interpret_true_runs_the_triton_kernels():
    # Triton reads TRITON_INTERPRET=true as on and makes interpreted kernels; the launchers
    # read only "1" and took them for compiled ones: attention failed in capped_launch
    # ("'InterpretedFunction' object has no attribute 'params'"). A fresh process: Triton
    # decides at import.
    code = ("import torch, minigpt\n"
            "from minigpt import ops\n"
            "torch.manual_seed(0)\n"
            "q, k, v = (torch.randn(1, 2, 16, 32) for _ in range(3))\n"
            "o = ops.attention(q, k, v, causal=True, backend='triton')\n"
            "r = ops.attention(q, k, v, causal=True, backend='torch')\n"
            "torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)\n"
            "x = torch.randn(8, 64, requires_grad=True)\n"
            "w, b = torch.randn(64), torch.randn(64)\n"
            "y = ops.layer_norm(x, w, b, backend='triton')\n"
            "torch.testing.assert_close(y, ops.layer_norm(x, w, b, backend='torch'),\n"
            "                           rtol=1e-4, atol=1e-5)\n"
            "print('OK')\n")
    env = dict(os.environ, TRITON_INTERPRET="true")
    env.pop("MINIGPT_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


@skip_if_triton_refused
@pytest.mark.parametrize("value, on", [(" 1", False), ("1 ", False), ("y", True), ("Yes", True)])
def test_triton_backend_offered_exactly_where_triton_interprets(monkeypatch, value, on):
    # The dispatch stripped the value and Triton does not: with " 1" the backend was offered
    # where @triton.jit made compiled kernels, which cannot take CPU tensors.
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert knobs.runtime.interpret is on  # Triton's own reading
    why = _backend._unavailable_reason("triton", torch.device("cpu"))
    assert (why is None) is on, why
    if not on:
        assert "interpreter" in why


# ----------------------------------------------------------------------------------------------
# generate() on one model from two threads


def test_overlapping_generate_calls_keep_the_model_in_eval_and_restore_it():
    # Each call saved model.training and restored it at its end: with two at once, the first
    # to finish put a model that was training back in training mode while the other still
    # decoded (dropout in its samples), and the second then "restored" the eval mode it had
    # found, leaving the model out of training for good.
    m = _tiny_gpt(40, dropout=0.5)
    prompt = torch.tensor([[1, 2, 3]])
    m.eval()
    want = generate(m, prompt, 12, temperature=1.0, seed=5)
    m.train()

    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    modes_b, out = [], {}

    def stream_a(tok):
        if not a_in.is_set():
            a_in.set()
            _wait(b_in, "B's first token")

    def stream_b(tok):
        if not b_in.is_set():
            b_in.set()
            _wait(a_done, "A to finish")
        else:
            modes_b.append(m.training)

    def run_a():
        try:
            out["a"] = generate(m, prompt, 12, temperature=1.0, seed=5, stream=stream_a)
        finally:
            a_done.set()

    def run_b():
        _wait(a_in, "A's first token")
        out["b"] = generate(m, prompt, 12, temperature=1.0, seed=5, stream=stream_b)

    _in_threads(run_a, run_b)
    assert modes_b and not any(modes_b), "B decoded in training mode after A ended"
    assert m.training, "the model was left in eval mode"
    assert torch.equal(out["a"], want) and torch.equal(out["b"], want)


# ----------------------------------------------------------------------------------------------
# sample_checkpoint(backend=...) from two threads: MINIGPT_BACKEND comes back as it was


@pytest.fixture
def run_dir(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    ckpt.save_checkpoint(tmp_path / "run", _tiny_gpt(tok.vocab_size), tok, {"step": 0})
    return tmp_path / "run"


class _GateOut(io.StringIO):
    """An ``out`` whose first write signals ``entered`` and waits for ``go``."""

    def __init__(self, entered, go):
        super().__init__()
        self.entered, self.go = entered, go

    def write(self, s):
        if not self.entered.is_set():
            self.entered.set()
            _wait(self.go, "the other thread")
        return super().write(s)


@pytest.mark.parametrize("before", [None, "cpu"])
def test_overlapping_sample_calls_restore_minigpt_backend(run_dir, monkeypatch, before):
    # Each call restored what it had found: A set torch, B found torch and set cpu, A
    # restored B's starting point... and B, ending last, left MINIGPT_BACKEND=torch in the
    # process for every later op.
    if before is None:
        monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(_backend.ENV_VAR, before)
    want = sample_checkpoint(run_dir, "First", 6, temperature=0, out=io.StringIO())
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    seen, got = {}, {}

    def run_a():
        try:
            got["a"] = sample_checkpoint(run_dir, "First", 6, temperature=0, backend="torch",
                                         out=_GateOut(a_in, b_in))
        finally:
            a_done.set()

    class _SeeB(_GateOut):
        def write(self, s):
            if self.entered.is_set() and "after_a" not in seen:
                seen["after_a"] = os.environ.get(_backend.ENV_VAR)
            return super().write(s)

    def run_b():
        _wait(a_in, "A's first write")
        got["b"] = sample_checkpoint(run_dir, "First", 6, temperature=0, backend="cpu",
                                     out=_SeeB(b_in, a_done))

    _in_threads(run_a, run_b)
    assert got["a"] == got["b"] == want
    assert seen["after_a"] == "cpu"  # B's block still open: B's choice holds
    assert os.environ.get(_backend.ENV_VAR) == before


def test_backend_env_nests_in_one_thread(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "cpu")
    with _backend.backend_env("torch"):
        with _backend.backend_env(None):
            assert _backend.ENV_VAR not in os.environ
        assert os.environ[_backend.ENV_VAR] == "torch"
        with pytest.raises(RuntimeError):
            with _backend.backend_env("triton"):
                raise RuntimeError
        assert os.environ[_backend.ENV_VAR] == "torch"
    assert os.environ[_backend.ENV_VAR] == "cpu"


# ----------------------------------------------------------------------------------------------
# train() as a library function


def test_train_leaves_the_callers_random_generator_as_it_was(tmp_path):
    # train() seeds torch's global generator for the weights and every step's dropout: a
    # caller's seeded draws after it came from the run's last step seed, not from its own.
    from minigpt.train import make_config, train

    (tmp_path / "c.txt").write_text(TEXT * 40, encoding="utf-8")
    cfg = make_config("seed", data=str(tmp_path / "c.txt"), out_dir=str(tmp_path / "run"),
                      n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.1, batch_size=2,
                      max_iters=2, eval_interval=10, eval_iters=1, log_interval=1,
                      ckpt_interval=10, sample_tokens=0, device="cpu", dtype="float32",
                      progress=False, seed=7)
    torch.manual_seed(1234)
    torch.rand(3)
    want = torch.rand(5)
    torch.manual_seed(1234)
    torch.rand(3)
    threads = torch.get_num_threads()
    train(cfg)
    assert torch.equal(torch.rand(5), want)
    assert torch.get_num_threads() == threads
