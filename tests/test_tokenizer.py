"""CharTokenizer: vocabulary from a corpus, round trips, unknown characters, saving."""
import json

import pytest

from minigpt.tokenizer import CharTokenizer


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
