"""minigpt sample: KV-cached sampling from a checkpoint, reproducible seeds, greedy equal to
recomputation, bad prompts and checkpoints."""
import io

import pytest
import torch

from minigpt import checkpoint as ckpt
from minigpt.cli import main
from minigpt.model import GPT, GPTConfig
from minigpt.sampling import sample_checkpoint
from minigpt.tokenizer import CharTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


@pytest.fixture
def run_dir(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(3)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=tok.vocab_size))
    with torch.no_grad():   # larger weights than the init: varied, non-uniform predictions
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    ckpt.save_checkpoint(tmp_path / "run", m, tok, {"step": 0})
    return tmp_path / "run"


def greedy_recompute(model, ids, n):
    x = torch.tensor([ids])
    for _ in range(n):
        logits, _ = model(x[:, -model.config.block_size:])
        x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0].tolist()


def test_greedy_sample_matches_full_recompute(run_dir):
    ck = ckpt.load_checkpoint(run_dir)
    tok = ck["tokenizer"]
    out = io.StringIO()
    # 5 + 27 = the whole context (32): every step after the prefill is a cached decode step
    texts = sample_checkpoint(run_dir, "First", max_new_tokens=27, temperature=0, out=out,
                              device="cpu")
    assert texts[0] == tok.decode(greedy_recompute(ck["model"], tok.encode("First"), 27))
    assert len(set(texts[0][5:])) > 3
    assert out.getvalue() == texts[0] + "\n"   # streamed piece by piece, same text


def test_seeded_sampling_is_reproducible(run_dir):
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=10, top_p=0.95, device="cpu",
              out=io.StringIO())
    a = sample_checkpoint(run_dir, "he", seed=5, num_samples=2, **kw)
    b = sample_checkpoint(run_dir, "he", seed=5, num_samples=2, **kw)
    c = sample_checkpoint(run_dir, "he", seed=6, num_samples=2, **kw)
    assert a == b and a != c and a[0] != a[1]
    assert all(t.startswith("he") and len(t) == 42 for t in a)


def test_cli_sample(run_dir, capsys):
    rc = main(["sample", "--checkpoint", str(run_dir), "--prompt", "hear", "--max-new-tokens",
               "25", "--temperature", "0.8", "--top-k", "5", "--seed", "1", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("hear") and len(out.rstrip("\n")) >= 29
    # the checkpoint/ subdirectory works as well as the run directory
    assert main(["sample", "--checkpoint", str(run_dir / "checkpoint"), "--prompt", "hear",
                 "--max-new-tokens", "25", "--temperature", "0.8", "--top-k", "5", "--seed", "1",
                 "--device", "cpu", "--no-stream"]) == 0
    assert capsys.readouterr().out == out


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "Zebra"], "outside the checkpoint's vocabulary: 'Z', 'b'"),
    (["--prompt", ""], "prompt is empty"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0 (0 = greedy), got inf"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-k", "-3"], "--top-k must be >= 0 (0: no limit), got -3"),
    (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 0, got -3"),
])
def test_cli_bad_arguments(run_dir, capsys, argv, match):
    assert main(["sample", "--checkpoint", str(run_dir), "--device", "cpu", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minigpt sample: error:") and match in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_device_without_cuda(run_dir, capsys):
    assert main(["sample", "--checkpoint", str(run_dir), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err == "minigpt sample: error: --device cuda: CUDA is not available on this machine\n", err


def test_cli_generate_chat_needs_a_chat_template(run_dir, capsys):
    # a character-level checkpoint has no chat template: --chat is refused by name
    assert main(["generate", "--model", str(run_dir), "--prompt", "he", "--chat",
                 "--device", "cpu", "--max-new-tokens", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minigpt generate: error:") and "no chat template" in err, err
    assert main(["generate", "--model", str(run_dir), "--prompt", "he", "--device", "cpu",
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("he")


def test_cli_threads(run_dir, capsys, monkeypatch):
    import minigpt.sampling as sampling

    seen = []
    real = sampling.generate

    def spy(*a, **kw):
        seen.append(torch.get_num_threads())
        return real(*a, **kw)

    monkeypatch.setattr(sampling, "generate", spy)
    before = torch.get_num_threads()
    # 3: more than this 2-core machine's default, and than the busy-machine choice of 1
    assert main(["sample", "--checkpoint", str(run_dir), "--device", "cpu", "--threads", "3",
                 "--max-new-tokens", "2"]) == 0
    assert seen == [3] and torch.get_num_threads() == before
    assert main(["sample", "--checkpoint", str(run_dir), "--device", "cpu", "--threads", "0"]) == 1
    assert "threads must be a positive integer, got 0" in capsys.readouterr().err


def test_cli_generate_prompt_longer_than_the_context(run_dir, capsys):
    prompt = "he" * 20    # 40 characters, context 32
    assert main(["generate", "--model", str(run_dir), "--prompt", prompt, "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == ("minigpt generate: error: the prompt is 40 tokens long, longer "
                                 "than the model's context of 32 tokens\n"), (out, err)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_library_refuses_nonfinite_temperature(run_dir, temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        sample_checkpoint(run_dir, "he", temperature=temperature, device="cpu", out=io.StringIO())
    from minigpt.inspect import load_model, next_token_steps
    model, tok, _ = load_model(run_dir)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        next_token_steps(model, tok, "he", 1, 3, temperature, None, 0)


def test_cli_missing_or_truncated_checkpoint(run_dir, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "nothing")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    f = run_dir / "checkpoint" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert main(["sample", "--checkpoint", str(run_dir), "--device", "cpu"]) == 1
    assert "corrupt or truncated" in capsys.readouterr().err


def test_help(capsys):
    from minigpt.cli import _commands
    from minigpt.train import PRESETS, TrainConfig

    helps = {}
    bench = [["bench", w] for w in ("train", "decode", "ops")]
    for argv in [[m.NAME] for m in _commands()] + bench:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0
        helps[" ".join(argv)] = out = " ".join(capsys.readouterr().out.split())
        # no default that misleads: None where the help says what happens, True on a --no-x
        for bad in ("(default: None)", "(default: True)", "(default: False)", "(default: )"):
            assert bad not in out, (argv, bad, out)
    assert "--checkpoint" in helps["sample"] and "(default: 1337)" in helps["sample"]
    # train's options show each preset's value rather than only "from --config"
    warm = {k: v.get("warmup_iters", TrainConfig.warmup_iters) for k, v in PRESETS.items()}
    assert (f"linear warmup steps (default from --config: seed {warm['seed']}, "
            f"shakespeare_char {warm['shakespeare_char']}, baby {warm['baby']})") in helps["train"]
    assert f"AdamW beta1 (default: {TrainConfig.beta1})" in helps["train"]
    assert "greedy decoding with the KV cache" in helps["bench decode"]   # a description


@pytest.mark.parametrize("flush_to_zero", [False, True], ids=["ieee", "ftz"])
def test_tiny_temperature_samples_the_best_token(flush_to_zero):
    """logits / 1e-40 overflowed every logit to +-inf, whose softmax is NaN; the best logit
    now goes to 0 first, so a tiny temperature is greedy, as its limit is. With flush-to-zero
    on (torch 2.5's Inductor turns it on for the process), 1e-40 is a subnormal that the
    division reads as 0, and the best logit became 0 / 0 = NaN; below float32's smallest
    normal the sampler is greedy outright."""
    from minigpt.sampling import sample_next, tempered

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 5
    tied = logits.clone()
    tied[1, 7] = tied[1].max()  # both best tokens stay in the limit
    if flush_to_zero and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals to zero")
    try:
        for t in (1e-40, 1e-45, 1e-30, 1e-38):
            assert torch.equal(sample_next(logits, temperature=t, top_p=0.9), logits.argmax(-1))
            scaled = tempered(tied, t)
            best = tied == tied.amax(-1, keepdim=True)
            assert not scaled.isnan().any()
            assert (scaled[best] == 0).all() and (scaled[~best] < -1e29).all()
            if t < 1e-38:
                assert (scaled[~best] == float("-inf")).all()
    finally:
        torch.set_flush_denormal(False)
    # and an ordinary temperature still samples from softmax(logits / T): the empirical
    # frequencies of a 3-token row match it
    row = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    got = torch.bincount(sample_next(row, 0.7, generator=torch.Generator().manual_seed(1)),
                         minlength=3).float() / 20000
    torch.testing.assert_close(got, torch.softmax(row[0] / 0.7, -1), atol=0.015, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nonfinite_logits_are_an_error_not_token_zero(bad, temperature):
    from minigpt.sampling import sample_next

    logits = torch.randn(2, 9)
    logits[1, 4] = bad
    with pytest.raises(ValueError, match="logits hold NaN or inf"):
        sample_next(logits, temperature)
    logits[1, 4] = float("-inf")  # a masked token is fine
    assert sample_next(logits, temperature).shape == (2,)


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.8),
                                dict(temperature=1.0, top_k=2, top_p=0.5)])
def test_a_row_of_only_minus_inf_is_an_error_not_token_zero(kw):
    """Every token masked out: greedy returned token 0 without a word, sampling failed with
    torch's 'probability tensor contains either inf, nan or element < 0'."""
    from minigpt.sampling import sample_next

    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [-1.0, 0.5, 0.0, 1.0], [3.0, 0.0, 1.0, 2.0]])
    logits[:, 0] = float("-inf")
    logits[1] = float("-inf")
    with pytest.raises(ValueError, match=r"every logit of row\(s\) \[1\] is -inf"):
        sample_next(logits, **kw)
    logits[1, 3] = -1e30   # one token left: that one
    got = sample_next(logits, generator=torch.Generator().manual_seed(0), **kw)
    assert got[1] == 3 and (got != 0).all()
    if kw["temperature"] == 0:
        assert got.tolist() == [2, 3, 3]
    for half in (torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match=r"row\(s\) \[0, 1\] is -inf"):
            sample_next(torch.full((2, 5), float("-inf"), dtype=half), **kw)
    with pytest.raises(ValueError, match=r"must be a \(batch, vocab\) tensor, got \(2, 0\)"):
        sample_next(torch.zeros(2, 0), **kw)


def test_sample_backend_is_for_the_call_only(run_dir, monkeypatch):
    import os

    monkeypatch.delenv("MINIGPT_BACKEND", raising=False)
    out = io.StringIO()
    a = sample_checkpoint(run_dir, "First", 8, temperature=0, backend="torch", out=out)
    assert "MINIGPT_BACKEND" not in os.environ
    assert sample_checkpoint(run_dir, "First", 8, temperature=0, out=out) == a
    monkeypatch.setenv("MINIGPT_BACKEND", "cpu")
    sample_checkpoint(run_dir, "First", 8, temperature=0, backend="torch", out=out)
    assert os.environ["MINIGPT_BACKEND"] == "cpu"
    with pytest.raises(ValueError, match="unknown backend 'xyz'"):
        sample_checkpoint(run_dir, "First", 8, backend="xyz", out=out)
    assert os.environ["MINIGPT_BACKEND"] == "cpu"


def test_sample_says_when_the_prompt_is_longer_than_the_context(run_dir):
    prompt = ("First Citizen: hear me speak. " * 3)[:70]
    with pytest.warns(UserWarning, match="70 characters, longer than the model's context of 32"):
        text = sample_checkpoint(run_dir, prompt, 4, temperature=0, out=io.StringIO())
    assert text[0].startswith(prompt) and len(text[0]) == 74


def test_seed_and_device_arguments_are_clear_errors(run_dir, capsys):
    from minigpt.sampling import seeded_generator

    for bad in (2 ** 63, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
            seeded_generator(bad, "cpu")
    assert seeded_generator(2 ** 63 - 1, "cpu").initial_seed() == 2 ** 63 - 1
    assert main(["sample", "--checkpoint", str(run_dir), "--seed", str(10 ** 23),
                 "--max-new-tokens", "2"]) == 1
    assert "seed must be an integer" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(run_dir), "--device", "tpu",
                 "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "--device must be auto, cpu, cuda or cuda:N, got 'tpu'" in err and len(err) < 200, err
