"""Looking inside a model: its size by part, its tokens, its attention maps and its next-token
probabilities. The library behind ``minigpt inspect``, ``minigpt tokenize``, ``minigpt
attention`` and ``minigpt next-token``.

Everything here works on the same two kinds of model: a ``minigpt train`` checkpoint (a
character-level MiniGPT) and a pretrained one through ``minigpt.load`` (SmolLM2 from the packaged
GGUF, another GGUF, a Hugging Face folder).

Attention maps: the fused attention kernels never form the T x T matrix of attention weights
(that is their point), so we capture the q and k each layer hands to ``ops.attention`` during an
ordinary forward pass and compute the weights with the reference softmax,
``reference.softmax(q kᵀ, scale, causal=True)``: the exact probabilities the kernel's online
softmax works with.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from minigpt._backend import pick_device
from minigpt.model import GPT, GPTConfig

# ---- loading ------------------------------------------------------------------------------


def _is_checkpoint_dir(path) -> bool:
    """Whether ``path`` is a ``minigpt train`` checkpoint (or a run folder holding one), decided
    as ``minigpt.load`` decides it. The files alone tell nothing: every single-file Hugging Face
    folder, ``minigpt export``'s included, also holds config.json, tokenizer.json and
    model.safetensors, and read as a checkpoint it failed on its config."""
    from minigpt import checkpoint, hf

    p = Path(path)
    if not p.is_dir() or hf.is_hf_folder(str(p)):
        return False
    for d in (p, p / checkpoint.CKPT, p / f"{checkpoint.CKPT}.old"):
        cfg = d / checkpoint.CONFIG_FILE
        if cfg.is_file():   # the one checkpoint.resolve would read
            try:
                return hf.read_json_object(str(cfg)).get("format") == checkpoint.FORMAT
            except (ValueError, OSError):  # unreadable: minigpt.load names the problem
                return False
    return False


def _check_source(checkpoint, model):
    if checkpoint is None and model is None:
        raise ValueError("give a model: --checkpoint DIR (a `minigpt train` run) or --model NAME "
                         "(e.g. smollm2, a .gguf file, a Hugging Face folder)")


def load_model(checkpoint=None, model=None, device="cpu", dtype=torch.float32,
               need_tokenizer=True):
    """-> (model in eval mode, tokenizer, label) from a ``minigpt train`` checkpoint directory
    or a ``minigpt.load`` name/path (checkpoint wins when both are given). A model without a
    tokenizer is an error unless ``need_tokenizer`` is False (the tokenizer is then None)."""
    _check_source(checkpoint, model)
    if checkpoint is None and _is_checkpoint_dir(model):
        checkpoint = model
    if checkpoint is not None:
        from minigpt.checkpoint import load_checkpoint

        ck = load_checkpoint(checkpoint, device=device, dtype=dtype)
        return ck["model"], ck["tokenizer"], f"checkpoint {ck['path']}"
    import minigpt

    m, tok = minigpt.load(model, dtype=dtype, device=device)
    if tok is None and need_tokenizer:
        raise ValueError(f"{model} has no tokenizer; cannot turn text into tokens")
    return m.eval(), tok, f"model {model}"


def _layers(n: int) -> str:
    return f"{n} layer" + "s" * (n != 1)


def _gguf_path(model) -> Optional[str]:
    from minigpt import loaders

    name = os.fspath(model)
    if name.lower() in loaders.PACKAGED and not os.path.exists(name):  # as minigpt.load: a
        return loaders.packaged_path(name.lower())                     # path of that name wins
    if os.path.isfile(name):
        return name
    return None


_GGUF_CACHE: dict = {}


def _gguf_file(path):
    """GGUFFile, parsed once per process and file version: reading the metadata of SmolLM2
    (49k tokens, 49k merges) takes seconds, and tokenize / inspect both need it."""
    from minigpt.loaders import GGUFFile

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    got = _GGUF_CACHE.get(key)
    if got is None:
        got = GGUFFile(path)
        # One file kept. One lookup, not a check then a read: another thread loading another
        # file clears the cache in between (a KeyError here); at worst it is parsed twice.
        _GGUF_CACHE.clear()
        _GGUF_CACHE[key] = got
    return got


def load_tokenizer(checkpoint=None, model=None):
    """The tokenizer alone; for a GGUF it is read from the metadata without touching the
    weights (seconds instead of dequantizing 135M parameters)."""
    _check_source(checkpoint, model)
    if checkpoint is None and _is_checkpoint_dir(model):
        checkpoint = model
    if checkpoint is not None:
        from minigpt.checkpoint import TOKENIZER_FILE, resolve
        from minigpt.tokenizer import CharTokenizer

        return CharTokenizer.load(resolve(checkpoint) / TOKENIZER_FILE)
    gguf = _gguf_path(model)
    if gguf is not None:
        from minigpt.bpe import BPETokenizer

        return BPETokenizer.from_gguf_metadata(_gguf_file(gguf).meta)
    return load_model(model=model)[1]


@dataclass
class ModelInfo:
    """What ``inspect`` reports: a model (possibly on the meta device: shapes, no weights) and
    where it came from."""
    model: GPT
    tokenizer: object
    label: str
    dtype: torch.dtype
    file: Optional[str] = None
    file_bytes: Optional[int] = None
    file_types: dict = field(default_factory=dict)   # storage type -> number of tensors


def _meta_model(config: GPTConfig) -> GPT:
    # Shapes only: parameter counts of a 175B model without allocating 700 GB.
    with torch.device("meta"):
        return GPT(config)


def load_info(checkpoint=None, model=None, dtype=torch.float32) -> ModelInfo:
    """A ``ModelInfo`` for inspect. A GGUF is read for its metadata and tensor types only: the
    parameter table needs shapes, not values."""
    _check_source(checkpoint, model)
    if checkpoint is None and _is_checkpoint_dir(model):
        checkpoint = model
    if checkpoint is None:
        gguf = _gguf_path(model)
        if gguf is not None:
            from minigpt.bpe import BPETokenizer
            from minigpt.loaders import gguf_config

            g = _gguf_file(gguf)
            cfg = gguf_config(g)
            types: dict = {}
            for t in g.tensors.values():
                name = getattr(t.tensor_type, "name", str(t.tensor_type))
                types[name] = types.get(name, 0) + 1
            return ModelInfo(_meta_model(cfg), BPETokenizer.from_gguf_metadata(g.meta),
                             f"model {model} ({os.path.basename(gguf)})", dtype,
                             os.path.basename(gguf),
                             os.path.getsize(gguf), types)
    m, tok, label = load_model(checkpoint, model, "cpu", dtype, need_tokenizer=False)
    file, types = None, {}
    if checkpoint is not None:
        from safetensors import safe_open

        from minigpt.checkpoint import MODEL_FILE, resolve

        file = str(resolve(checkpoint) / MODEL_FILE)
        with safe_open(file, framework="pt") as f:   # the stored dtypes, from the header
            for k in f.keys():
                t = f.get_slice(k).get_dtype()
                types[t] = types.get(t, 0) + 1
    return ModelInfo(m, tok, label, m.transformer.wte.weight.dtype, file,
                     os.path.getsize(file) if file else None, types)


# ---- parameter counts ---------------------------------------------------------------------

PARTS = ("token embedding", "position embedding", "attention", "MLP", "norms", "head")


def _part(name: str) -> str:
    if name.startswith("transformer.wte."):
        return "token embedding"
    if name.startswith("transformer.wpe."):
        return "position embedding"
    if name.startswith("transformer.ln_f."):
        return "norms"
    if name.startswith("lm_head."):
        return "head"
    if name.startswith("transformer.h."):
        sub = name.split(".")[3]
        if sub == "attn":
            return "attention"
        if sub == "mlp":
            return "MLP"
        if sub.startswith("ln_"):
            return "norms"
    raise ValueError(f"inspect: parameter {name!r} belongs to no known part of the model")


def param_counts(model: GPT) -> dict:
    """{part: number of parameters} over ``PARTS``. A tied head shares the token embedding's
    matrix, so it is counted once, under the embedding (``head`` is then 0)."""
    counts = {p: 0 for p in PARTS}
    # named_parameters skips the second name of a shared tensor, which is what counts once.
    for name, p in model.named_parameters():
        counts[_part(name)] += p.numel()
    return counts


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def _markdown(header, rows, align=None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---" if a == "l" else "---:" for a in align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def param_table(model: GPT) -> str:
    """The parameter-count table by part, as Markdown."""
    c = model.config
    counts = param_counts(model)
    total = sum(counts.values())
    what = {
        "token embedding": f"wte: {c.vocab_size} x {c.n_embd}",
        "position embedding": (f"wpe: {c.block_size} x {c.n_embd}" if c.pos == "learned"
                               else "none: rotary (RoPE) rotates q and k instead"),
        "attention": (f"q,k,v,o projections; {c.n_head} query / {c.n_kv_head} key-value heads "
                      f"of {c.head_dim}"),
        "MLP": (f"{'GELU' if c.mlp == 'gelu' else 'SwiGLU'}: {c.n_embd} -> "
                f"{c.intermediate_size} -> {c.n_embd}"),
        "norms": f"{'LayerNorm' if c.norm == 'layernorm' else 'RMSNorm'}: 2 per layer + final",
        "head": ("tied to the token embedding: the same matrix, counted once above"
                 if c.tie_embeddings else f"lm_head: {c.n_embd} -> {c.vocab_size}"),
    }
    rows = []
    for part in PARTS:
        n = counts[part]
        per_layer = f"{n // c.n_layer:,}" if part in ("attention", "MLP") else ""
        share = 100 * n / total
        share = f"{share:.1f}%" if share >= 0.1 or n == 0 else "<0.1%"
        rows.append([part, f"{n:,}", share, per_layer, what[part]])
    rows.append(["**total**", f"**{total:,}**", "100%", "", _layers(c.n_layer)])
    return _markdown(["part", "parameters", "share", "per layer", "what"], rows, "lrrrl")


# Reference models, built from their published hyperparameters with our own GPTConfig (GPT-2
# and GPT-3 are this architecture: learned positions, pre-LayerNorm, GELU, tied head), so the
# counts come from the same code as the table above.
REFERENCE_MODELS = {
    "GPT-2 small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "GPT-2 medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "GPT-2 large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257),
    "GPT-2 XL": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
    "GPT-3 175B": dict(n_layer=96, n_head=96, n_embd=12288, block_size=2048, vocab_size=50257),
}
_REF_CACHE: dict = {}


def reference_sizes() -> list:
    """[(name, GPTConfig, parameters)] for ``REFERENCE_MODELS``."""
    out = []
    for name, kw in REFERENCE_MODELS.items():
        if name not in _REF_CACHE:
            cfg = GPTConfig(**kw)
            _REF_CACHE[name] = (cfg, sum(p.numel() for p in _meta_model(cfg).parameters()))
        cfg, n = _REF_CACHE[name]
        out.append((name, cfg, n))
    return out


def comparison_table(model: Optional[GPT] = None, name: str = "this model", others=()) -> str:
    """MiniGPT vs GPT-2 / GPT-3 sizes as Markdown; ``model`` adds its row in bold, ``others``
    ([(name, model)]) plain rows, all in size order."""
    entries = [(n, cfg, p, False) for n, cfg, p in reference_sizes()]
    extra = ([(name, model, True)] if model is not None else []) + [(n, m, False) for n, m in others]
    for n, m, mine in extra:
        entries.append((n, m.config, sum(p.numel() for p in m.parameters()), mine))
    entries.sort(key=lambda e: e[2])
    rows = []
    for n, cfg, p, mine in entries:
        heads = str(cfg.n_head) if cfg.n_kv_head == cfg.n_head else f"{cfg.n_head} ({cfg.n_kv_head} kv)"
        row = [n, _human(p), str(cfg.n_layer), str(cfg.n_embd), heads, f"{cfg.block_size:,}",
               f"{cfg.vocab_size:,}", _bytes(2 * p)]
        rows.append([f"**{c}**" for c in row] if mine else row)
    return _markdown(["model", "parameters", "layers", "d_model", "heads", "context", "vocab",
                      "16-bit weights"], rows)


def inspect_report(info: ModelInfo) -> str:
    """The text ``minigpt inspect`` prints."""
    m, c = info.model, info.model.config
    total = sum(p.numel() for p in m.parameters())
    family = ("GPT: learned positions, LayerNorm, GELU MLP" if c.pos == "learned" and
              c.norm == "layernorm" and c.mlp == "gelu" else
              "Llama-style: " + ", ".join([
                  "RoPE" if c.pos == "rope" else "learned positions",
                  "RMSNorm" if c.norm == "rmsnorm" else "LayerNorm",
                  "SwiGLU" if c.mlp == "swiglu" else "GELU",
                  "grouped-query attention" if c.n_kv_head < c.n_head else "multi-head attention"]))
    tok = info.tokenizer
    tok_kind = ("no tokenizer" if tok is None else
                "characters" if type(tok).__name__ == "CharTokenizer" else "byte-level BPE")
    elt = torch.empty((), dtype=info.dtype).element_size()
    lines = [f"# {info.label}", "",
             f"{family}; {_layers(c.n_layer)}, {c.n_head} heads of {c.head_dim}, d_model "
             f"{c.n_embd}.",
             f"context length: {c.block_size:,} tokens; vocabulary: {c.vocab_size:,} tokens "
             f"({tok_kind})",
             f"weights: {total:,} parameters in {str(info.dtype).replace('torch.', '')} = "
             f"{_bytes(total * elt)} in memory ({elt} bytes each)"]
    if "wpe" in m.transformer:
        lines.append(f"({m.num_params():,} without the position embedding, nanoGPT's count, as "
                     "`minigpt train` prints it)")
    if info.file:
        types = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(info.file_types.items()))
        lines.append(f"file: {info.file} ({_bytes(info.file_bytes)}; stored as {types})")
    cfg = ", ".join(f"{k}={v}" for k, v in c.to_dict().items())
    lines += [f"config: {cfg}", "", "## Parameters by part", "", param_table(m), "",
              "## Next to GPT-2 and GPT-3", "", comparison_table(m), ""]
    gpt2 = reference_sizes()[0][2]
    ratio = gpt2 / total
    lines.append(f"GPT-2 small has {ratio:.1f}x the parameters of this model." if ratio >= 1
                 else f"This model has {1 / ratio:.1f}x the parameters of GPT-2 small.")
    return "\n".join(lines)


# ---- tokens -------------------------------------------------------------------------------

def _is_char(tok) -> bool:
    return type(tok).__name__ == "CharTokenizer"


def token_pieces(tok, ids) -> list:
    """The text of each token on its own. A byte-level BPE token can be part of a multi-byte
    character and decode to U+FFFD alone; it then shows as its raw vocabulary entry."""
    out = []
    for i in ids:
        s = tok.decode([i])
        if "\ufffd" in s and hasattr(tok, "token"):
            s = tok.token(i) or s
        out.append(s)
    return out


def show(piece: str) -> str:
    """A token's text made visible: spaces as '·', newlines and tabs escaped."""
    return piece.replace(" ", "\u00b7").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def encode_prompt(tok, text: str) -> list:
    if not isinstance(text, str):
        raise TypeError(f"the text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("the text is empty: give at least one character")
    ids = tok.encode(text)
    if not ids:
        raise ValueError(f"the text {text!r} encodes to no tokens")
    return ids


def token_table(tok, text: str, title: str) -> str:
    """A table of the tokens of ``text``: position, id, vocabulary entry, decoded text."""
    ids = encode_prompt(tok, text)
    pieces = token_pieces(tok, ids)
    kind = "character-level" if _is_char(tok) else "byte-level BPE"
    lines = [f"{title}: {kind}, vocabulary {tok.vocab_size:,}: {len(ids)} tokens for "
             f"{len(text)} characters ({len(text) / len(ids):.2f} characters per token)"]
    entries = [tok.token(i) if hasattr(tok, "token") else p for i, p in zip(ids, pieces)]
    w_id = max(len("id"), max(len(str(i)) for i in ids))
    w_en = max(len("token"), max(len(repr(e)) for e in entries))
    lines.append(f"  {'#':>4}  {'id':>{w_id}}  {'token':<{w_en}}  text")
    for n, (i, e, p) in enumerate(zip(ids, entries, pieces)):
        lines.append(f"  {n:>4}  {i:>{w_id}}  {repr(e):<{w_en}}  {p!r}")
    lines.append("  pieces: " + segmented(pieces))
    return "\n".join(lines)


def segmented(pieces) -> str:
    return "|".join(show(p) for p in pieces)


def tokenize_report(text: str, char_tok=None, bpe_tok=None) -> str:
    """One table per tokenizer given; with both, the segmentations side by side at the end."""
    toks = [(t, n) for t, n in ((char_tok, "characters"), (bpe_tok, "BPE")) if t is not None]
    if not toks:
        raise ValueError("tokenize: no tokenizer given")
    parts = [token_table(t, text, n) for t, n in toks]
    if len(toks) == 2:
        lines = ["side by side (| separates tokens, \u00b7 is a space):"]
        for t, n in toks:
            ids = t.encode(text)
            lines.append(f"  {n:<10} {len(ids):>4} tokens  {segmented(token_pieces(t, ids))}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# ---- attention ----------------------------------------------------------------------------

@contextlib.contextmanager
def capture_attention_inputs(model: GPT, layers=None):
    """Within the block, every ``ops.attention`` (or ``ops.attention_qkv``) call the model
    makes records its q, k (after RoPE, before any GQA expansion) and scale into the yielded
    dict: layer -> (q, k, scale).

    The model calls them through the ``minigpt.ops`` module, so swapping those attributes for
    recording wrappers sees exactly the tensors the kernel gets, without repeating the model's
    projection / RoPE code here. A forward pre-hook on each attention module says which layer
    is calling."""
    from minigpt import ops

    wanted = None if layers is None else set(layers)
    store: dict = {}
    current = [None]

    def pre_hook(module, args):
        current[0] = module.layer_idx

    orig = ops.attention

    def recording_attention(q, k, v, causal=True, scale=None, backend=None, record_only=False,
                            **kwargs):
        layer = current[0]
        if layer is not None and (wanted is None or layer in wanted):
            if not causal:
                raise RuntimeError("inspect: the model called non-causal attention")
            store[layer] = (q.detach(), k.detach(),
                            1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))
        if record_only:
            return None
        return orig(q, k, v, causal=causal, scale=scale, backend=backend, **kwargs)

    orig_qkv = ops.attention_qkv

    def recording_attention_qkv(qkv, n_head, n_kv_head=None, causal=True, scale=None,
                                backend=None, **kwargs):
        layer = current[0]
        if layer is not None and (wanted is None or layer in wanted):
            from minigpt.ops.attention import _qkv_split  # the op's own view of the heads

            q, k, _ = _qkv_split(qkv.detach(), n_head, n_head if n_kv_head is None
                                 else n_kv_head)
            recording_attention(q, k, None, causal=causal, scale=scale, record_only=True)
        return orig_qkv(qkv, n_head, n_kv_head, causal=causal, scale=scale, backend=backend,
                        **kwargs)

    handles = [blk.attn.register_forward_pre_hook(pre_hook) for blk in model.transformer.h]
    ops.attention, ops.attention_qkv = recording_attention, recording_attention_qkv
    try:
        yield store
    finally:
        ops.attention, ops.attention_qkv = orig, orig_qkv
        for h in handles:
            h.remove()


def attention_weights(q, k, scale) -> torch.Tensor:
    """(B, Hq, T, S) attention probabilities from q (B, Hq, T, D) and k (B, Hkv, S, D), in
    float32: the reference causal softmax of q kᵀ (key head h // (Hq/Hkv) for query head h)."""
    from minigpt import reference

    rep = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(rep, dim=1)
    scores = q.float() @ kf.transpose(-1, -2)
    return reference.softmax(scores, scale=scale, causal=True)


def _check_layer_head(config: GPTConfig, layer, head):
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {layer!r}")
    if not -config.n_layer <= layer < config.n_layer:
        raise ValueError(f"layer {layer} is out of range: the model has {config.n_layer} layers "
                         f"(0..{config.n_layer - 1}, or -1 for the last)")
    layer %= config.n_layer
    if head is not None:
        if isinstance(head, bool) or not isinstance(head, int):
            raise TypeError(f"head must be an int or None, got {head!r}")
        if not 0 <= head < config.n_head:
            raise ValueError(f"head {head} is out of range: layer {layer} has {config.n_head} "
                             f"heads (0..{config.n_head - 1})")
    return layer


MAX_MAP_TOKENS = 256   # beyond this a heatmap's labels are unreadable


@dataclass
class AttentionMaps:
    ids: list
    pieces: list
    layer: int
    weights: torch.Tensor          # (n_head, T, T) float32, rows sum to 1 over j <= i
    head: Optional[int] = None     # the head asked for, or None for all


@torch.no_grad()
def attention_maps(model: GPT, tok, prompt: str, layer: int = 0,
                   head: Optional[int] = None) -> AttentionMaps:
    """Attention weights of every head of ``layer`` for ``prompt`` (one forward pass)."""
    layer = _check_layer_head(model.config, layer, head)
    ids = encode_prompt(tok, prompt)
    T = len(ids)
    if T > model.config.block_size:
        raise ValueError(f"the prompt is {T} tokens, longer than the model's context of "
                         f"{model.config.block_size}")
    if T > MAX_MAP_TOKENS:
        raise ValueError(f"the prompt is {T} tokens; a map of more than {MAX_MAP_TOKENS} is "
                         "unreadable, use a shorter prompt")
    device = model.transformer.wte.weight.device
    model.eval()
    with capture_attention_inputs(model, [layer]) as store:
        model(torch.tensor([ids], device=device), only_last=True)
    q, k, scale = store[layer]
    w = attention_weights(q, k, scale)[0].cpu()
    return AttentionMaps(ids, token_pieces(tok, ids), layer, w, head)


def top_keys_report(maps: AttentionMaps, top: int = 3) -> str:
    """For each query token, the keys it attends to most (for the chosen head, or averaged over
    the heads)."""
    w = maps.weights[maps.head] if maps.head is not None else maps.weights.mean(0)
    which = f"head {maps.head}" if maps.head is not None else f"mean over {maps.weights.shape[0]} heads"
    lines = [f"layer {maps.layer}, {which}: each token and the keys it attends to most"]
    width = max(len(repr(p)) for p in maps.pieces)
    for i, p in enumerate(maps.pieces):
        vals, idx = torch.topk(w[i, :i + 1], min(top, i + 1))
        keys = ", ".join(f"{j}:{maps.pieces[j]!r} {v:.2f}" for v, j in zip(vals.tolist(), idx.tolist()))
        lines.append(f"  {i:>3} {p!r:<{width}} -> {keys}")
    return "\n".join(lines)


DPI = 100


def _grid(n_panels: int):
    cols = math.ceil(math.sqrt(n_panels))
    return math.ceil(n_panels / cols), cols


def figure_size(n_tokens: int, n_panels: int = 1) -> tuple:
    """(width, height) in pixels of the PNG ``plot_attention`` writes: a grid of about square
    panels, each 300 px + 18 px per token (at most 1000), plus 120 px for the colour bar and
    60 px for the title."""
    rows, cols = _grid(n_panels)
    panel = min(300 + 18 * n_tokens, 1000)
    return cols * panel + 120, rows * panel + 60


def plot_attention(maps: AttentionMaps, out, title: Optional[str] = None) -> str:
    """Write a PNG heatmap: one head (``maps.head``) or a grid of all heads of the layer.
    Rows are queries, columns keys; the masked future is blank."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    heads = [maps.head] if maps.head is not None else list(range(maps.weights.shape[0]))
    T = len(maps.ids)
    width, height = figure_size(T, len(heads))
    rows, cols = _grid(len(heads))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    labels = [show(p) for p in maps.pieces]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    fontsize = max(4.0, min(10.0, 300 / max(T, 1) * (0.5 if len(heads) > 1 else 1.0)))
    # A square-root colour scale: the weights that are not the largest stay visible.
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    im = None
    for n, h in enumerate(heads):
        ax = fig.add_subplot(rows, cols, n + 1)
        data = np.ma.masked_array(maps.weights[h].numpy(), mask=future)
        im = ax.imshow(data, cmap="viridis", norm=norm, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=10)
        step = max(1, math.ceil(T / 48))
        ticks = list(range(0, T, step))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels([labels[t] for t in ticks], rotation=90, fontsize=fontsize)
        ax.set_yticklabels([labels[t] for t in ticks], fontsize=fontsize)
        if n % cols == 0:
            ax.set_ylabel("query (attending token)")
        if n >= len(heads) - cols:
            ax.set_xlabel("key (attended-to token)")
    fig.suptitle(title or f"attention weights, layer {maps.layer}", fontsize=12)
    fig.colorbar(im, ax=fig.axes, shrink=0.6, label="weight (square-root colour scale)")
    out = os.fspath(out)
    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out


# ---- next-token probabilities -------------------------------------------------------------

@dataclass
class Step:
    context: str                 # the text so far (prompt + chosen tokens)
    candidates: list             # [(token id, text, probability)], most likely first
    chosen: int                  # the token id picked
    chosen_text: str
    chosen_prob: float
    chosen_rank: int             # 1 = the most likely
    text: str = ""               # context + the chosen token, decoded together


@torch.no_grad()
def next_token_steps(model: GPT, tok, prompt: str, steps: int = 5, top: int = 5,
                     temperature: float = 1.0, top_p: Optional[float] = None,
                     seed: Optional[int] = None) -> list:
    """Generate ``steps`` tokens one at a time (KV cache: the prompt once, then one token per
    pass) and record, at each step, the ``top`` most likely next tokens with their
    probabilities: softmax(logits / temperature) (plain softmax for temperature 0, which then
    picks the most likely). The pick itself is ``sampling.sample_next``."""
    from minigpt.sampling import sample_next, tempered

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), "
                         f"got {temperature!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    ids = encode_prompt(tok, prompt)
    block = model.config.block_size
    if len(ids) >= block:
        raise ValueError(f"the prompt is {len(ids)} tokens; the model's context of {block} "
                         "leaves no room for a next token")
    steps = min(steps, block - len(ids))
    device = model.transformer.wte.weight.device
    from minigpt.sampling import seeded_generator

    gen = seeded_generator(seed, device)
    stops = set(getattr(tok, "stop_ids", ()) or ())
    model.eval()
    cache = model.new_cache(1, max_seqlen=len(ids) + steps)
    logits, _ = model(torch.tensor([ids], device=device), cache=cache, only_last=True)
    out, context = [], list(ids)
    top = min(top, model.config.vocab_size)
    for s in range(steps):
        last = logits[:, -1, :].float()
        probs = torch.softmax(tempered(last, temperature) if temperature > 0 else last, dim=-1)[0]
        p, i = torch.topk(probs, top)
        nxt = int(sample_next(last, temperature, None, top_p, gen)[0])
        rank = int((probs > probs[nxt]).sum()) + 1
        out.append(Step(tok.decode(context), [(int(a), token_pieces(tok, [int(a)])[0], float(b))
                                              for a, b in zip(i.tolist(), p.tolist())],
                        nxt, token_pieces(tok, [nxt])[0], float(probs[nxt]), rank,
                        # decoded whole: a character of several byte tokens is only one once
                        # all of them are there, never the context's U+FFFD plus a piece
                        tok.decode(context + [nxt])))
        context.append(nxt)
        if nxt in stops or s + 1 == steps:
            break
        logits, _ = model(torch.tensor([[nxt]], device=device), cache=cache, only_last=True)
    return out


def steps_report(steps: list, bar_width: int = 30) -> str:
    lines = []
    for n, st in enumerate(steps, 1):
        ctx = st.context if len(st.context) <= 60 else "..." + st.context[-57:]
        lines.append(f"step {n}: after {ctx!r}")
        width = max(len(repr(c[1])) for c in st.candidates)
        for rank, (i, text, p) in enumerate(st.candidates, 1):
            mark = "  <- chosen" if i == st.chosen else ""
            bar = "\u2588" * max(0, round(p * bar_width))
            lines.append(f"  {rank:>2}. {text!r:<{width}} {p:7.2%} {bar}{mark}".rstrip())
        if all(c[0] != st.chosen for c in st.candidates):
            lines.append(f"      chosen: {st.chosen_text!r} {st.chosen_prob:.2%} "
                         f"(rank {st.chosen_rank})")
    if steps:
        last = steps[-1]
        lines.append(f"text: {last.text!r}")
    return "\n".join(lines)


# ---- command-line helpers (shared by the inspect / tokenize / attention / next-token commands)

def add_source_arguments(p, device=True, both=False):
    # One or the other, except where both are shown side by side (tokenize): elsewhere one
    # would be ignored without a word.
    src = p if both else p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR", default=None,
                     help="a `minigpt train` output directory (or its checkpoint/)")
    src.add_argument("--model", metavar="NAME", default=None,
                     help="'smollm2' (the packaged GGUF), a .gguf file, a Hugging Face folder or "
                          "a checkpoint folder")
    if device:
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype to load the weights in")


def model_from_args(args):
    """(model, tokenizer, label) for --checkpoint / --model / --device / --dtype."""
    from minigpt.loaders import parse_dtype

    return load_model(args.checkpoint, args.model, pick_device(args.device),
                      parse_dtype(args.dtype))
