"""Character-level tokenizer: one token per distinct character of the training corpus.

Unknown characters: ``encode`` raises ValueError naming every character the vocabulary has
never seen. A char-level model has no sensible embedding for a character it never trained on,
and silently mapping it to some "unknown" id would make the sample look like the model chose
it; the error tells the user to change the prompt (or retrain on a corpus that has it).
"""
from __future__ import annotations

import json
import operator
import os
from typing import Iterable

import numpy as np

FORMAT = "minigpt-char-tokenizer"
VERSION = 1  # tokenizer.json's layout: a newer one is refused by name, not misread


class CharTokenizer:

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer: the vocabulary is empty (an empty corpus?)")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer: vocabulary entries must be single characters, "
                                 f"got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: the vocabulary has duplicate characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        # Code point -> id table for fast vectorized encoding of a whole corpus.
        self._codes = np.array([ord(c) for c in chars], dtype=np.int64)
        self._order = np.argsort(self._codes)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The sorted set of characters in ``text`` (sorted: the same corpus always gives the
        same ids)."""
        if not text:
            raise ValueError("CharTokenizer: cannot build a vocabulary from empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self):
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """``text`` -> int64 numpy array of ids (fast for a multi-megabyte corpus)."""
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.encode: expected str, got {type(text).__name__}")
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._codes[self._order], codes)
        pos = np.minimum(pos, len(self._order) - 1)
        ids = self._order[pos]
        bad = self._codes[ids] != codes
        if bad.any():
            missing = self.unknown(text)
            shown = ", ".join(repr(c) for c in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise ValueError(f"text has {len(missing)} character(s) outside the tokenizer's "
                             f"vocabulary of {self.vocab_size}: {shown}{more}")
        return ids

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):  # a 0-dim tensor's tolist(), or one id
            raise TypeError(f"CharTokenizer.decode: ids must be a sequence of ids, got the "
                            f"single id {ids!r} (wrap it in a list)")
        out = []
        for i in ids:
            # operator.index, as BPETokenizer.decode: a numpy integer or a 0-d tensor (a list of
            # sampled ids) is an id too; a float or a bool is not.
            try:
                j = None if isinstance(i, bool) else operator.index(i)
            except TypeError:
                j = None
            if j is None:
                raise TypeError(f"CharTokenizer.decode: ids must be integers, got {i!r:.80}")
            if not 0 <= j < len(self.chars):
                raise ValueError(f"CharTokenizer.decode: id {j} is outside the vocabulary "
                                 f"(0..{len(self.chars) - 1})")
            out.append(self.chars[j])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "chars": self.chars}

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=True, indent=0)
            f.write("\n")

    @classmethod
    def from_dict(cls, d) -> "CharTokenizer":
        if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("chars"), list):
            raise ValueError(f"not a MiniGPT character tokenizer (expected a JSON object with "
                             f"format={FORMAT!r} and a 'chars' list)")
        version = d.get("version", VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"character tokenizer: 'version' must be a positive integer, got "
                             f"{version!r}")
        if version > VERSION:
            raise ValueError(f"character tokenizer format version {version} was written by a "
                             f"newer MiniGPT; this one reads version {VERSION}: upgrade minigpt")
        return cls(d["chars"])

    @classmethod
    def load(cls, path) -> "CharTokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid tokenizer JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
