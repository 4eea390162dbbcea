"""Hugging Face export and import: our GPT -> a folder GPT2LMHeadModel loads with the same
logits (1e-4, fp32), our Llama -> LlamaForCausalLM, and back to identical weights; the char
tokenizer survives as a tokenizer.json transformers reads; --push-to-hub fails clearly offline
or without a token. Nothing touches the network."""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import minigpt  # noqa: E402
from minigpt import hf  # noqa: E402
from minigpt.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from minigpt.cli import main  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.tokenizer import CharTokenizer  # noqa: E402

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll: Speak, speak!"


def _randomize(m):
    # Larger than init so logits differ clearly and a transposed or misplaced weight shows.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return m.eval()


@pytest.fixture(params=[True, False], ids=["bias", "nobias"])
def gpt_ckpt(request, tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=tok.vocab_size,
                    bias=request.param)
    model = _randomize(GPT(cfg))
    save_checkpoint(tmp_path / "run", model, tok)
    return tmp_path / "run", model, tok


def _ids(tok, n=20):
    return torch.tensor([tok.encode(TEXT[:n]), tok.encode(TEXT[-n:])])


def test_gpt_export_loads_in_gpt2lmheadmodel(gpt_ckpt, tmp_path):
    run, model, tok = gpt_ckpt
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run), "--format", "hf", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["activation_function"] == "gelu"
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    ids = _ids(tok)
    with torch.no_grad():
        ours = model(ids)[0]
        theirs = ref(ids).logits
    assert ours.abs().max() > 1
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # the character tokenizer, as transformers reads it
    rtok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert rtok(TEXT)["input_ids"] == tok.encode(TEXT)
    assert rtok.decode(tok.encode(TEXT)) == TEXT


def test_gpt_import_back_is_identical(gpt_ckpt, tmp_path):
    run, model, tok = gpt_ckpt
    out, back = tmp_path / "hf", tmp_path / "back"
    hf.export_hf(model, str(out), tok)
    ids = _ids(tok)
    # as a loader path ...
    m2, tok2 = minigpt.load(str(out))
    # ... and as a MiniGPT checkpoint again
    assert main(["export", "--checkpoint", str(out), "--format", "minigpt", "--out", str(back)]) == 0
    ck = load_checkpoint(back)
    with torch.no_grad():
        want = model(ids)[0]
        for m in (m2, ck["model"]):
            assert torch.equal(m(ids)[0], want)
    assert tok2.chars == tok.chars == ck["tokenizer"].chars
    if not model.config.bias:  # zero biases in the GPT-2 file; same function either way
        assert m2.config.bias


def test_export_carries_the_attention_dropout(tmp_path):
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=5, dropout=0.2))
    hf.export_hf(gpt, str(tmp_path / "g"))
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "g"))
    assert ref.config.attn_pdrop == ref.config.resid_pdrop == 0.2
    llama = GPT(GPTConfig.llama(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=5,
                                dropout=0.2))
    hf.export_hf(llama, str(tmp_path / "l"))
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "l"))
    assert ref.config.attention_dropout == 0.2


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_llama_export_loads_in_llamaforcausallm(tmp_path, tie):
    cfg = GPTConfig.llama(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=24,
                          vocab_size=41, intermediate_size=48, rope_base=5000.0,
                          tie_embeddings=tie)
    model = _randomize(GPT(cfg))
    hf.export_hf(model, str(tmp_path))
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 41, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids)[0], atol=1e-4, rtol=1e-4)
        back, _ = minigpt.load(str(tmp_path))
        assert torch.equal(back(ids)[0], model(ids)[0])


def test_export_smollm2_shaped_gguf_roundtrip(tmp_path):
    """A GGUF-loaded Llama exports to a folder that loads back identically (exercises the
    BPE tokenizer's save/load on the way)."""
    from tests.test_llama import _train_bpe, write_tiny_llama

    path, _, _ = write_tiny_llama(str(tmp_path), *_train_bpe())
    # float32 matmuls only (not the packed decode path): the comparison below is bit-exact
    model, tok = minigpt.load(path, packed=False)
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", path, "--out", str(out)]) == 0
    back, tok2 = minigpt.load(str(out))
    ids = torch.tensor([tok.encode("The quick brown fox")])
    with torch.no_grad():
        assert torch.equal(back(ids)[0], model(ids)[0])
    assert tok2.encode(TEXT) == tok.encode(TEXT) and tok2.chat_template == tok.chat_template
    # the GGUF's <|endoftext|> stops generation too, not only its eos <|im_end|>
    assert tok.stop_ids == {0, 2} and tok2.stop_ids == tok.stop_ids
    assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == [2, 0]
    rtok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert rtok(TEXT)["input_ids"] == tok.encode(TEXT)


def test_import_folder_written_by_transformers(tmp_path):
    """A GPT2LMHeadModel saved by transformers itself (not by our exporter) imports with
    the same logits."""
    cfg = transformers.GPT2Config(vocab_size=53, n_positions=32, n_embd=48, n_layer=2, n_head=3,
                                  activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref.save_pretrained(str(tmp_path))
    model, tok = minigpt.load(str(tmp_path))
    assert tok is None  # no tokenizer in that folder
    ids = torch.randint(0, 53, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], ref(ids).logits, atol=1e-4, rtol=1e-4)


# ---- push to hub -------------------------------------------------------------------------------

def test_push_to_hub_offline_fails_clearly(gpt_ckpt, tmp_path, monkeypatch, capsys):
    run, _, _ = gpt_ckpt
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    rc = main(["export", "--checkpoint", str(run), "--out", str(out), "--push-to-hub", "me/model"])
    assert rc == 1
    assert "offline mode is on" in capsys.readouterr().err
    assert not out.exists()  # it failed before writing anything


def test_push_to_hub_without_token_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(RuntimeError, match="no token found.*huggingface-cli login"):
        hf.push_to_hub(str(tmp_path), "me/model")


def test_push_to_hub_network_error_is_rephrased(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub

    def no_network(self, *a, **k):
        raise OSError("Failed to establish a new connection: [Errno -3] name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    with pytest.raises(RuntimeError, match="failed.*check your network connection"):
        hf.push_to_hub(str(tmp_path), "me/model", token="hf_fake")


def test_push_to_hub_bad_repo_id(tmp_path):
    with pytest.raises(ValueError, match="user/name"):
        hf.push_to_hub(str(tmp_path), "no-slash")


# ---- bad input ---------------------------------------------------------------------------------

def test_import_refuses_gelu_new(gpt_ckpt, tmp_path):
    _, model, tok = gpt_ckpt
    out = tmp_path / "hf"
    hf.export_hf(model, str(out), tok)
    cfg = json.loads((out / "config.json").read_text())
    cfg["activation_function"] = "gelu_new"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gelu_new"):
        minigpt.load(str(out))


def test_import_bad_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        minigpt.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1,
                                                      "n_head": 2, "n_embd": 8, "vocab_size": 5,
                                                      "activation_function": "gelu"}))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        minigpt.load(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        minigpt.load(str(tmp_path))


def test_export_refuses_models_without_hf_layout(tmp_path):
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=5, block_size=8, pos="rope")
    with pytest.raises(ValueError, match="no Hugging Face layout"):
        hf.export_hf(GPT(cfg), str(tmp_path))
    with pytest.raises(ValueError, match="--out must differ"):
        main_raise(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path)])


def main_raise(argv):
    from minigpt.cli import build_parser

    args = build_parser().parse_args(argv)
    return args._run(args)


def test_export_out_that_is_a_file_is_a_clear_error(gpt_ckpt, tmp_path, capsys):
    run, _, _ = gpt_ckpt
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert main(["export", "--checkpoint", str(run), "--out", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minigpt export: error: --out") and "is a file" in err, err
    assert main(["export", "--checkpoint", str(run), "--out", str(f / "hf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minigpt export: error:") and len(err.strip().splitlines()) == 1, err
    assert f.read_text() == "keep me"


# ---- what export must never destroy --------------------------------------------------------

def test_export_never_writes_into_or_over_its_source(gpt_ckpt, capsys):
    """The checkpoint folder, its run folder, and folders around or inside either are refused,
    with or without --overwrite; the source is untouched."""
    run, _, _ = gpt_ckpt
    before = {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()}
    for src, out in ((run, run / "checkpoint"), (run / "checkpoint", run), (run, run / "hf"),
                     (run, run.parent)):
        for fmt in ("hf", "minigpt"):
            for extra in ((), ("--overwrite",)):
                assert main(["export", "--checkpoint", str(src), "--format", fmt, "--out",
                             str(out), *extra]) == 1
                assert "overwrite the source" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()} == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]


def test_export_replaces_only_when_asked_and_leaves_no_stale_file(gpt_ckpt, tmp_path, capsys):
    run, model, tok = gpt_ckpt
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert (out / hf.MINIGPT_TOKENIZER).is_file()
    # a Llama from a GGUF into the same folder: refused, then replaced whole with --overwrite
    llama = GPT(GPTConfig.llama(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, block_size=16,
                                vocab_size=41, intermediate_size=24))
    with pytest.raises(ValueError, match="not empty"):
        hf.export_hf(llama, str(out))
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    hf.export_hf(llama, str(out), overwrite=True)
    # the char tokenizer of the first export would have been loaded with these weights
    assert not (out / hf.MINIGPT_TOKENIZER).exists()
    back, _ = minigpt.load(str(out))
    assert back.config.vocab_size == 41 and back.config.pos == "rope"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders
    # a folder that is not a model folder, or that holds a training run, is never replaced
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a model folder"):
        hf.export_hf(model, str(notes), tok, overwrite=True)
    with pytest.raises(ValueError, match="training run"):
        hf.export_hf(model, str(run), tok, overwrite=True)
    assert (notes / "todo.txt").read_text() == "keep me"


def test_import_never_replaces_a_run_unasked(gpt_ckpt, tmp_path, capsys):
    run, model, tok = gpt_ckpt
    out = tmp_path / "hf"
    hf.export_hf(model, str(out), tok)
    other = tmp_path / "other"
    save_checkpoint(other, model, tok, {"step": 6})
    before = (other / "checkpoint" / "config.json").read_text()
    assert main(["export", "--checkpoint", str(out), "--format", "minigpt", "--out",
                 str(other)]) == 1
    assert "already holds a checkpoint (step 6)" in capsys.readouterr().err
    assert (other / "checkpoint" / "config.json").read_text() == before
    assert main(["export", "--checkpoint", str(out), "--format", "minigpt", "--out",
                 str(other), "--overwrite"]) == 0
    assert "imported_from" in load_checkpoint(other)["config"]["train"]


def test_folder_mixing_a_tokenizer_of_another_model_is_refused(gpt_ckpt, tmp_path):
    _, model, tok = gpt_ckpt
    out = tmp_path / "hf"
    hf.export_hf(model, str(out), tok)
    # the character vocabulary one entry short: ids would silently decode to other characters
    short = CharTokenizer(tok.chars[:-1])
    short.save(str(out / hf.MINIGPT_TOKENIZER))
    with pytest.raises(ValueError, match=f"tokenizer has {tok.vocab_size - 1} tokens but the "
                                         f"model's vocab_size is {tok.vocab_size}"):
        minigpt.load(str(out))
