"""Byte-level BPE tokenizer for Llama-family checkpoints (SmolLM2 and friends).

The merging itself is the ``tokenizers`` library's job; this module only assembles a tokenizer
from what a checkpoint ships - a GGUF's ``tokenizer.ggml.*`` metadata or a Hugging Face
``tokenizer.json`` - and adds what generation needs on top: the special token ids, the chat
template, and a decoder that streams text one token at a time without tearing multi-byte
characters apart.
"""
from __future__ import annotations

import datetime
import json
import numbers
import operator
import os
import warnings
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp's token_type values (llama_token_type): 3 marks control tokens such as
# <|im_start|>, which must be matched whole in the text, never cut into bytes.
_CONTROL, _USER_DEFINED = 3, 4

# How llama.cpp pre-splits text before BPE, per ``tokenizer.ggml.pre``. The merges were learned on
# text split this way, so ids only come out right with the same split. Tokenizers that split
# digits one by one (StarCoder's, which SmolLM uses) do it before the GPT-2 regex, as llama.cpp
# and SmolLM2's own tokenizer.json do. (transformers' GGUF loader skips that step for these
# names, so its ids differ from ours where whitespace meets a digit: tests/test_smollm2.py.)
_GPT2_PRE = ("gpt2", "default", "smollm", "starcoder", "refact", "codeshell", "command-r",
             "exaone", "minerva-7b")
_DIGITS_FIRST = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_REGEX_PRE = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
              "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT}


def _pre_tokenizer(pre: str):
    if pre in _REGEX_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_REGEX_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in _GPT2_PRE:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre!r}: supported are "
            f"{sorted(set(_GPT2_PRE) | set(_REGEX_PRE))}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_FIRST:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` plus the special ids and chat template of one checkpoint.

    ``encode`` never adds a BOS unless the checkpoint asks for one (``add_bos``), matching
    transformers' tokenizer for the same checkpoint; special tokens written in the text
    (``<|im_start|>``) are recognised whole, which is what chat templates rely on.
    """

    def __init__(self, tokenizer: Tokenizer, *, bos_id=None, eos_id=None, pad_id=None,
                 unk_id=None, add_bos=False, chat_template=None, stop_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        stops = set(stop_ids)
        if eos_id is not None:
            stops.add(eos_id)
        self.stop_ids = frozenset(stops)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "BPETokenizer":
        """Build from a GGUF's ``tokenizer.ggml.*`` keys (a dict of already-decoded values)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE ('gpt2') is "
                "supported")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
        token_type = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise ValueError(f"malformed BPE merge {m!r} in GGUF file")
            pairs.append((a, b))
        try:
            tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
        except Exception as e:  # tokenizers raises a bare Exception: a merge of unknown tokens
            raise ValueError(f"GGUF tokenizer: the merges do not fit the vocabulary "
                             f"({e})") from None
        tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt2"))
        tok.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, token_type) if ty == _CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, token_type) if ty == _USER_DEFINED]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
        if tok.get_vocab_size() != len(tokens):
            raise ValueError("GGUF tokenizer vocabulary has duplicate tokens")
        endoftext = vocab.get("<|endoftext|>")
        ids = {name: _gguf_token_id(meta, f"tokenizer.ggml.{key}_token_id", len(tokens),
                                    used=name in ("bos_id", "eos_id"))
               for name, key in (("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding"),
                                 ("unk_id", "unknown"))}
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
        # bool("false") is True: a flag stored as a string would turn on what it turns off
        if not isinstance(add_bos, bool):
            raise ValueError(f"GGUF metadata 'tokenizer.ggml.add_bos_token' must be a boolean, "
                             f"got {add_bos!r}")
        return cls(tok, **ids, add_bos=add_bos, chat_template=meta.get("tokenizer.chat_template"),
                   stop_ids=[endoftext] if endoftext is not None else ())

    @classmethod
    def from_dir(cls, path: str) -> "BPETokenizer":
        """Build from a Hugging Face folder: tokenizer.json (+ tokenizer_config.json,
        special_tokens_map.json, generation_config.json when present)."""
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        try:
            tok = Tokenizer.from_file(tj)
        except Exception as e:  # tokenizers raises a bare Exception
            raise ValueError(f"{tj} is not a readable tokenizer.json ({e})") from None
        # Padding or truncation saved in the file would pad every prompt (and the BOS probe
        # below) or cut it without a word; transformers turns both off for each call too.
        tok.no_padding()
        tok.no_truncation()
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        cfg.update({k: v for k, v in _read_json(os.path.join(path, "special_tokens_map.json")).items()
                    if k not in cfg})
        model_cfg = _read_json(os.path.join(path, "config.json"))

        def tid(name):
            t = cfg.get(name)
            if isinstance(t, dict):
                t = t.get("content")
            return tok.token_to_id(t) if isinstance(t, str) else None

        bos = tid("bos_token")
        eos = tid("eos_token")
        if eos is None and isinstance(model_cfg.get("eos_token_id"), int):
            eos = model_cfg["eos_token_id"]
        if bos is None and isinstance(model_cfg.get("bos_token_id"), int):
            bos = model_cfg["bos_token_id"]
        gen = _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
        stops = [gen] if isinstance(gen, int) else list(gen or [])
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tok.get_vocab_size()
                   for i in stops):
            raise ValueError(f"{os.path.join(path, 'generation_config.json')}: eos_token_id must "
                             f"be token ids of the vocabulary, got {gen!r}")
        template = cfg.get("chat_template")
        if template is None and os.path.isfile(os.path.join(path, "chat_template.jinja")):
            with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
                template = f.read()
        add_bos = cfg.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):  # "false" was truthy
            raise ValueError(f"{os.path.join(path, 'tokenizer_config.json')}: add_bos_token must "
                             f"be true or false, got {add_bos!r}")
        if add_bos is None:
            # Llama 3's folders say nothing in tokenizer_config.json: tokenizer.json's
            # post-processor (TemplateProcessing "<|begin_of_text|> $A") adds the BOS, and
            # transformers' tokenizer with it. Asked around an empty text, it names just what it
            # adds; an EOS after the text is left out, as a prompt to continue must not end in one.
            added = tok.encode("", add_special_tokens=True).ids
            add_bos = bos is not None and added[:1] == [bos]
        return cls(tok, bos_id=bos, eos_id=eos, pad_id=tid("pad_token"), unk_id=tid("unk_token"),
                   add_bos=add_bos, chat_template=template, stop_ids=stops)

    def save(self, path: str) -> None:
        """Write tokenizer.json + tokenizer_config.json so transformers' AutoTokenizer (and
        ``from_dir``) read the same tokenizer back."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
               "clean_up_tokenization_spaces": False, "model_max_length": 10 ** 30}
        for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                        ("pad_token", self.pad_id), ("unk_token", self.unk_id)):
            if i is not None:
                cfg[name] = self.tokenizer.id_to_token(i)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)

    # -- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:  # tokenizers' words for a str it cannot take (lone surrogates)
            raise ValueError("the text is not valid Unicode (it holds lone surrogates, e.g. "
                             "bytes a terminal could not decode)") from None
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise TypeError(f"decode: ids must be a sequence of integers, got "
                            f"{ids!r:.80}") from None
        n = self.tokenizer.get_vocab_size()
        # tokenizers drops an id past the vocabulary without a word, and overflows on one < 0
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"decode: ids must be ints in [0, {n}), got {bad[:5]!r}")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's Jinja chat template the way transformers does (sandboxed,
        trim_blocks + lstrip_blocks)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; use `generate` instead of chat")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"chat messages need 'role' and 'content', got {m!r}")
        from jinja2.exceptions import TemplateError

        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.token(self.bos_id) if self.bos_id is not None else "",
                eos_token=self.token(self.eos_id) if self.eos_id is not None else "")
        except TemplateError as e:  # a broken template, or its own raise_exception
            raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The token ids of the conversation rendered by the chat template. No BOS is added on
        top (``add_bos``): a template that wants one writes ``{{ bos_token }}`` itself, and
        adding another gave Llama 3 style checkpoints two. transformers' apply_chat_template
        encodes the rendered text the same way (add_special_tokens=False)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                           add_bos=False)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns tokens into text as they arrive. A byte-level token can end inside a multi-byte
    UTF-8 character; such a tail decodes to U+FFFD, so it is held back until the next token
    completes it.

    Each push decodes only the tokens since the last clean boundary (where the text so far
    ended on a whole character) rather than everything generated: re-decoding the whole
    sequence cost ~0.27 ms a token by 2-4k tokens (quadratic over a generation). Text is
    the decode of that window minus the decode of its already-emitted part, so a decoder
    that treats a sequence's first token specially still agrees with one full decode."""

    def __init__(self, tok: BPETokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here: a clean boundary
        self.read = 0    # ids before this have been emitted

    def _decode(self, start: int, end: int) -> str:
        return self.tok.decode(self.ids[start:end], skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._decode(self.prefix, self.read)
        text = self._decode(self.prefix, len(self.ids))
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        done = self._decode(self.prefix, self.read)
        text = self._decode(self.prefix, len(self.ids))
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


_TEMPLATES: dict[str, object] = {}


def _compile_template(source: str):
    """What transformers gives a chat template on top of plain sandboxed Jinja, so templates
    written for it render the same here (Llama 3's uses strftime_now and tojson, others
    {% break %} and {% generation %})."""
    if source not in _TEMPLATES:
        import jinja2.ext
        from jinja2 import nodes
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # Jinja's own tojson escapes <, >, & and ' for HTML, which a prompt must not get.
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.datetime.now().strftime(fmt)

        class Generation(jinja2.ext.Extension):
            # {% generation %}...{% endgeneration %} marks the assistant's text for training
            # masks in transformers; rendering, it is its body.
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.Scope(body).set_lineno(lineno)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols, Generation])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def _gguf_token_id(meta: dict, key: str, n_tokens: int, used: bool = True):
    """``meta[key]`` as a token id of the vocabulary (None when absent). One past it was added
    to every prompt (a BOS) and failed in the model; a string landed in the stop ids. An id
    that nothing here uses (``used`` False: padding, unknown) out of range is dropped with a
    warning, as llama.cpp does, rather than making the whole model unloadable."""
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"GGUF metadata {key!r} must be a token id in [0, {n_tokens}) (the "
                         f"vocabulary), got {v!r}")
    if not 0 <= v < n_tokens:
        if used:
            raise ValueError(f"GGUF metadata {key!r} must be a token id in [0, {n_tokens}) "
                             f"(the vocabulary), got {v!r}")
        warnings.warn(f"GGUF metadata {key!r} = {v} is outside the vocabulary of {n_tokens} "
                      "tokens; ignored", stacklevel=3)
        return None
    return int(v)


def _read_json(path: str) -> dict:
    """A folder's optional JSON file ({} when absent)."""
    if not os.path.isfile(path):
        return {}
    from minigpt.hf import read_json_object

    return read_json_object(path)
