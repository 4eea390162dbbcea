"""CharTokenizer: vocabulary from a corpus, round trips, unknown characters, saving.
BPETokenizer: how it is built from a GGUF's metadata or a Hugging Face folder and how it
encodes chats, against transformers' tokenizer for the same files."""
import json
import os

import numpy as np
import pytest
import torch

from minigpt.bpe import BPETokenizer
from minigpt.tokenizer import CharTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_vocab_is_sorted_unique_and_roundtrips():
    text = "to be, or not to be: that is the question.\nWhether 'tis nobler"
    tok = CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text)) and tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert len(ids) == len(text) and all(isinstance(i, int) for i in ids)
    assert ids == [tok.chars.index(c) for c in text]
    assert tok.decode(ids) == text
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_non_ascii_and_astral_characters():
    text = "naïve café — 日本語 🎭 ∑x²\tend"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("🎭") == [tok.chars.index("🎭")]


def test_unknown_characters_raise_naming_them():
    tok = CharTokenizer.from_text("abc abc\n")
    with pytest.raises(ValueError, match=r"2 character\(s\) outside.*'Z'.*'é'"):
        tok.encode("abZ cé")
    assert tok.unknown("abZ") == ["Z"]


def test_decode_rejects_out_of_range_ids():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


def test_decode_takes_numpy_and_tensor_ids():
    """A list of numpy ints or of 0-d tensors (iterating an array or a tensor of sampled ids)
    was refused as 'outside the vocabulary'."""
    tok = CharTokenizer.from_text("hello wörld 🙂")
    text = "hello 🙂 wörld"
    ids = tok.encode(text)
    for seq in (np.array(ids), list(np.array(ids)), list(np.array(ids, dtype=np.int32)),
                torch.tensor(ids), list(torch.tensor(ids)), [np.uint8(i) for i in ids]):
        assert tok.decode(seq) == text
    with pytest.raises(ValueError, match=f"id {len(tok.chars)} is outside the vocabulary"):
        tok.decode([np.int64(len(tok.chars))])
    with pytest.raises(ValueError, match="id -1 is outside the vocabulary"):
        tok.decode([torch.tensor(-1)])
    for bad in (1.0, np.float32(1), torch.tensor(1.0), True, "1"):
        with pytest.raises(TypeError, match="ids must be integers"):
            tok.decode([0, bad])


def test_save_load_roundtrip(tmp_path):
    tok = CharTokenizer.from_text("Hello, wörld! 🎭\n")
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    d = json.loads(path.read_text())
    assert d["format"] == "minigpt-char-tokenizer" and d["chars"] == tok.chars
    back = CharTokenizer.load(path)
    assert back.chars == tok.chars
    assert back.encode("wörld 🎭") == tok.encode("wörld 🎭")


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab"])
    with pytest.raises(TypeError, match="expected str"):
        CharTokenizer.from_text("ab").encode(b"ab")
    with pytest.raises(FileNotFoundError, match="not found"):
        CharTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid tokenizer JSON"):
        CharTokenizer.load(bad)
    bad.write_text(json.dumps({"format": "something-else", "chars": ["a"]}))
    with pytest.raises(ValueError, match="not a MiniGPT character tokenizer"):
        CharTokenizer.load(bad)
    good = CharTokenizer.from_text("ab").to_dict()
    bad.write_text(json.dumps({**good, "version": 2}))
    with pytest.raises(ValueError, match="format version 2 was written by a newer MiniGPT"):
        CharTokenizer.load(bad)
    bad.write_text(json.dumps({**good, "version": True}))
    with pytest.raises(ValueError, match="'version' must be a positive integer"):
        CharTokenizer.load(bad)


# ---- BPETokenizer ------------------------------------------------------------------------------

SPECIALS = ["<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS, EOS = 0, 3   # <|begin_of_text|>, <|im_end|>
# ChatML behind a {{ bos_token }}, as Llama 3's template starts
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")


@pytest.fixture(scope="module")
def bpe_meta():
    """A GGUF's tokenizer.ggml.* metadata for a byte-level BPE the tokenizers library learns
    here on a small corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The capital of France is Paris. Hello there, how are you?\n" * 20],
                            trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [None] * len(model["vocab"])
    for t, i in model["vocab"].items():
        tokens[i] = t
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m)
                                      for m in model["merges"]],
            "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
            "tokenizer.ggml.bos_token_id": BOS, "tokenizer.ggml.eos_token_id": EOS,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": BOS_TEMPLATE}


def _ids(x):
    # transformers 5's apply_chat_template(tokenize=True) returns a BatchEncoding, 4.x a list
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def test_chat_ids_have_the_templates_bos_only(bpe_meta, tmp_path, monkeypatch):
    """add_bos and a template that writes {{ bos_token }} (Llama 3): chat and generate --chat
    encoded the rendered text with encode(), which put a second BOS in front."""
    transformers = pytest.importorskip("transformers")
    from minigpt.commands import generate
    from minigpt.commands.chat import _fit
    from minigpt.model import GPT, GPTConfig

    tok = BPETokenizer.from_gguf_metadata(bpe_meta)
    assert tok.add_bos and tok.encode("Hello")[0] == BOS
    plain = dict(bpe_meta, **{"tokenizer.chat_template": BOS_TEMPLATE.replace(
        "{{ bos_token }}", "")})
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "The capital of France is"}]
    for meta in (bpe_meta, plain):
        ours = BPETokenizer.from_gguf_metadata(meta)
        d = tmp_path / str(len(meta["tokenizer.chat_template"]))
        ours.save(str(d))
        ref = transformers.AutoTokenizer.from_pretrained(str(d))
        for gen in (True, False):
            want = _ids(ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen))
            assert ours.encode_chat(msgs, add_generation_prompt=gen) == want
        want = _ids(ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
        # one BOS where the template writes it, none where it does not
        assert want[:2].count(BOS) == (meta is bpe_meta) and BOS not in want[1:]
        assert _fit(ours, msgs, 1000, 10) == (want, msgs)

        # generate --chat: the ids handed to the model
        seen = {}
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64,
                              vocab_size=ours.vocab_size))
        monkeypatch.setattr(generate, "load_for_args", lambda args: (model, ours))
        monkeypatch.setattr(generate, "stream_text",
                            lambda model, tok, ids, args, **kw: seen.setdefault("ids", ids))
        args = generate.argparse.Namespace(
            prompt=msgs[1]["content"], system=msgs[0]["content"], chat=True, model="tiny",
            max_new_tokens=2, stats=False)
        assert generate.run(args) == 0
        assert seen["ids"] == want


def test_from_dir_takes_the_bos_its_post_processor_adds(bpe_meta, tmp_path):
    """Llama 3's folders add the BOS through tokenizer.json's post-processor, with no
    add_bos_token in tokenizer_config.json; from_dir read that as no BOS."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import processors

    bos = bpe_meta["tokenizer.ggml.tokens"][BOS]
    texts = ["The capital of France is", "", " Hello there\n", "<|im_start|>user"]
    for post, adds in ((processors.TemplateProcessing(single=f"{bos} $A",
                                                      special_tokens=[(bos, BOS)]), True),
                       (processors.ByteLevel(trim_offsets=False), False), (None, False)):
        tok = BPETokenizer.from_gguf_metadata(bpe_meta)
        if post is not None:
            tok.tokenizer.post_processor = post
        d = tmp_path / str(adds) / str(post is None)
        tok.save(str(d))
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        del cfg["add_bos_token"]
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        ours = BPETokenizer.from_dir(str(d))
        ref = transformers.AutoTokenizer.from_pretrained(str(d))
        assert ours.add_bos is adds and ours.bos_id == BOS
        for text in texts:
            want = ref(text)["input_ids"]
            assert ours.encode(text) == want, (post, text)
            assert (want[:1] == [BOS]) is adds


def test_from_dir_ignores_padding_and_truncation_saved_in_the_file(bpe_meta, tmp_path):
    # a padding section made the BOS probe (and every prompt) come back padded: with left
    # padding by the BOS id, add_bos came out on and "hi" was 8 ids
    tok = BPETokenizer.from_gguf_metadata(bpe_meta)
    tok.save(str(tmp_path))
    want = BPETokenizer.from_dir(str(tmp_path))
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["padding"] = {"strategy": {"Fixed": 8}, "direction": "Left", "pad_to_multiple_of": None,
                     "pad_id": BOS, "pad_type_id": 0, "pad_token": tok.decode([BOS])}
    tj["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst",
                        "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    got = BPETokenizer.from_dir(str(tmp_path))
    assert got.add_bos is want.add_bos
    text = "The capital of France is"
    assert got.encode(text) == want.encode(text) and len(got.encode(text)) > 2


def test_from_dir_refuses_add_bos_token_as_text(bpe_meta, tmp_path):
    tok = BPETokenizer.from_gguf_metadata(bpe_meta)
    tok.save(str(tmp_path))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos_token="false")))
    with pytest.raises(ValueError, match="add_bos_token must be true or false, got 'false'"):
        BPETokenizer.from_dir(str(tmp_path))


@pytest.mark.parametrize("key,value,message", [
    ("bos_token_id", "VOCAB", r"'tokenizer.ggml.bos_token_id' must be a token id in \[0, N\)"),
    ("eos_token_id", "2", r"'tokenizer.ggml.eos_token_id' must be a token id .* got '2'"),
    ("eos_token_id", -1, r"'tokenizer.ggml.eos_token_id' must be a token id .* got -1"),
    ("padding_token_id", 2.0, r"'tokenizer.ggml.padding_token_id' must be a token id"),
    ("eos_token_id", "VOCAB", r"'tokenizer.ggml.eos_token_id' must be a token id in \[0, N\)"),
    ("unknown_token_id", True, r"'tokenizer.ggml.unknown_token_id' must be a token id"),
    ("add_bos_token", "false", r"'tokenizer.ggml.add_bos_token' must be a boolean, got 'false'"),
    ("add_bos_token", 0, r"'tokenizer.ggml.add_bos_token' must be a boolean, got 0"),
])
def test_gguf_metadata_ids_and_flags_are_checked(bpe_meta, key, value, message):
    """A BOS id past the vocabulary was put in front of every prompt, a string id landed in
    the stop ids, and the string "false" turned add_bos on."""
    n = len(bpe_meta["tokenizer.ggml.tokens"])
    value = n if value == "VOCAB" else value   # one past the last id
    with pytest.raises(ValueError, match=message.replace("N", str(n))):
        BPETokenizer.from_gguf_metadata(dict(bpe_meta, **{"tokenizer.ggml." + key: value}))


def test_gguf_unused_ids_out_of_range_are_dropped_with_a_warning(bpe_meta):
    # llama.cpp warns and goes on; refusing made the whole model unloadable for ids that
    # nothing here uses
    n = len(bpe_meta["tokenizer.ggml.tokens"])
    meta = dict(bpe_meta, **{"tokenizer.ggml.padding_token_id": n + 5,
                             "tokenizer.ggml.unknown_token_id": n})
    with pytest.warns(UserWarning) as said:
        tok = BPETokenizer.from_gguf_metadata(meta)
    assert sorted(str(w.message).split("'")[1] for w in said) == [
        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"]
    assert tok.pad_id is None and tok.unk_id is None and tok.eos_id == EOS


def test_gguf_metadata_ids_as_read(bpe_meta):
    meta = dict(bpe_meta, **{"tokenizer.ggml.padding_token_id": np.uint32(1),
                             "tokenizer.ggml.unknown_token_id":
                                 len(bpe_meta["tokenizer.ggml.tokens"]) - 1,
                             "tokenizer.ggml.add_bos_token": False})
    tok = BPETokenizer.from_gguf_metadata(meta)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (BOS, EOS, 1, tok.vocab_size - 1)
    assert type(tok.pad_id) is int and tok.stop_ids == {EOS, 1}   # <|endoftext|> is 1
    assert tok.add_bos is False and tok.encode("The")[0] != BOS
    del meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.add_bos_token"]
    tok = BPETokenizer.from_gguf_metadata(meta)
    assert tok.bos_id is None and tok.add_bos is False
