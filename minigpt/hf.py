"""Hugging Face folders in and out: read ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` folders
(config.json + *.safetensors) into our GPT, write our GPT back out in either layout, and push a
folder to the Hub.

Two layouts, chosen by the model's switches:

* GPT family (learned positions, LayerNorm, GELU MLP, tied head) <-> ``GPT2LMHeadModel``. Our
  parameter names are GPT-2's; only GPT-2's Conv1D weights (c_attn, c_proj, c_fc) are stored
  transposed ((in, out) instead of nn.Linear's (out, in)). GPT-2 always has biases, so a model
  trained with ``bias=False`` is written with zero biases - the same function. Our MLP uses the
  exact (erf) GELU, so the config says ``activation_function: "gelu"``; GPT-2's own
  ``gelu_new`` (tanh approximation) differs by up to ~1e-3 and is refused on import.
* Llama family (RMSNorm, RoPE, SwiGLU, GQA) <-> ``LlamaForCausalLM``: our fused c_attn is
  split back into q_proj | k_proj | v_proj.

Nothing here needs ``transformers``; config.json is written by hand with the keys its
``from_pretrained`` reads.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import uuid

import torch

from minigpt.model import GPT, GPTConfig

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_json_object(path):
    """A JSON file that must hold an object; a ValueError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(obj).__name__}")
    return obj


def is_hf_folder(path: str) -> bool:
    """A Hugging Face model folder: config.json that names a model_type."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        return "model_type" in read_json_object(cfg)
    except ValueError:
        return False


INDEX_FILE = "model.safetensors.index.json"


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = os.path.join(path, INDEX_FILE)
    weight_map = None
    if os.path.isfile(index):
        # A sharded folder names its shards: any other *.safetensors there (a stray copy, an
        # older shard) is not part of the model.
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard files")
        files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{index} names the shard {f}, which is missing")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        bins = glob.glob(os.path.join(path, "*.bin"))
        hint = " (only PyTorch .bin files, which are not read: re-save with safetensors)" if bins else ""
        raise FileNotFoundError(f"no *.safetensors weights in {path}{hint}")
    sd, origin = {}, {}
    for f in files:
        try:
            part = load_file(f)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file: {e}") from e
        for k in part:
            # Which copy would win depended on the files' sort order.
            if k in origin:
                raise ValueError(f"{path}: tensor {k!r} is in both {origin[k]} and "
                                 f"{os.path.basename(f)}; remove the file that does not belong")
            origin[k] = os.path.basename(f)
        sd.update(part)
    if weight_map is not None and set(sd) != set(weight_map):
        missing = sorted(set(weight_map) - set(sd))
        extra = sorted(set(sd) - set(weight_map))
        raise ValueError(f"{index} does not match its shards (missing {missing[:5]}, "
                         f"not in the index {extra[:5]})")
    return sd


def _check_tensors(sd: dict, path: str) -> None:
    """Floating point and finite, as a model's weights are: an integer tensor would have been
    cast without a word, and NaN only shows as garbage text (GGUFs and our checkpoints are
    held to the same)."""
    for k, v in sd.items():
        if not v.is_floating_point():
            raise ValueError(f"{path}: tensor {k!r} has dtype {v.dtype}; weights must be "
                             "floating point")
        if not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {k!r} holds NaN or inf values (a damaged file?)")


def _check_head_tie(sd: dict, head: str, embedding: str, path: str) -> None:
    """A tied model takes its head from the embedding; a different head in the file would be
    dropped without a word."""
    if head in sd and not torch.equal(sd[head], sd[embedding]):
        raise ValueError(f"{path}: config.json ties the head to the embedding "
                         f"(tie_word_embeddings), but the weights hold a different {head!r}; "
                         "fix tie_word_embeddings or the weights")


def llama_hf_shapes(config: GPTConfig) -> dict:
    """Every tensor of a LlamaForCausalLM with ``config``: name -> shape."""
    C, D, I, V = config.n_embd, config.head_dim, config.intermediate_size, config.vocab_size
    Hq, Hkv = config.n_head, config.n_kv_head
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    per_layer = {"input_layernorm": (C,), "post_attention_layernorm": (C,),
                 "self_attn.q_proj": (Hq * D, C), "self_attn.k_proj": (Hkv * D, C),
                 "self_attn.v_proj": (Hkv * D, C), "self_attn.o_proj": (C, Hq * D),
                 "mlp.gate_proj": (I, C), "mlp.up_proj": (I, C), "mlp.down_proj": (C, I)}
    for i in range(config.n_layer):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    return shapes


def _check_llama_tensors(sd: dict, config: GPTConfig, path: str) -> None:
    """The folder's tensors are exactly the config's, each of its shape. Converting without
    this dropped what it did not ask for (layers past num_hidden_layers, a q_proj bias) and
    took q|k|v by their sum of rows."""
    want = llama_hf_shapes(config)
    have = {k for k in sd if not k.endswith("rotary_emb.inv_freq")}  # recomputed buffers
    if config.tie_embeddings and "model.embed_tokens.weight" in sd:
        _check_head_tie(sd, "lm_head.weight", "model.embed_tokens.weight", path)
        have.discard("lm_head.weight")
    missing, extra = sorted(set(want) - have), sorted(have - set(want))
    if missing or extra:
        raise ValueError(f"{path}: the weights do not fit config.json's {config.n_layer}-layer "
                         f"llama (missing {missing[:5]}, unexpected {extra[:5]})")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{path}: tensor {k!r} has shape {tuple(sd[k].shape)}, config.json "
                             f"implies {shape}")


def _get(cfg, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


# --- reading ------------------------------------------------------------------------------------

def llama_config_from_hf(cfg: dict, where: str = "config.json") -> GPTConfig:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (Llama's SwiGLU uses silu)")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise ValueError(f"{where}: RoPE scaling {kind!r} is not supported")
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise ValueError(f"{where}: head_dim {head_dim} x {n_head} heads != hidden_size {n_embd}; "
                         "not supported")
    tie = cfg.get("tie_word_embeddings") or False   # null: transformers' false
    if not isinstance(tie, bool):  # the string "false" would tie
        raise ValueError(f"{where}: tie_word_embeddings must be true or false, got {tie!r}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"{where}: attention_bias / mlp_bias Llamas are not supported")
    return GPTConfig.llama(
        n_layer=cfg["num_hidden_layers"], n_head=n_head,
        n_kv_head=cfg.get("num_key_value_heads") or n_head, n_embd=n_embd,
        block_size=cfg.get("max_position_embeddings", 2048), vocab_size=cfg["vocab_size"],
        intermediate_size=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_base=float(_get(rope, "rope_theta", default=cfg.get("rope_theta", 10000.0))),
        tie_embeddings=tie)


def gpt2_config_from_hf(cfg: dict, where: str = "config.json") -> GPTConfig:
    act = cfg.get("activation_function", "gelu_new")
    if act != "gelu":
        raise ValueError(
            f"{where}: activation_function {act!r} is not supported: MiniGPT's MLP uses the "
            "exact GELU ('gelu'); GPT-2's tanh approximation would give silently different logits")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if cfg.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported")
    if cfg.get("scale_attn_weights", True) is not True:
        raise ValueError(f"{where}: scale_attn_weights=false is not supported")
    if cfg.get("tie_word_embeddings", True) is not True:
        raise ValueError(f"{where}: an untied GPT-2 head is not supported (tie_word_embeddings "
                         f"{cfg.get('tie_word_embeddings')!r})")
    n_embd = cfg["n_embd"]
    return GPTConfig(
        n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=n_embd,
        block_size=cfg.get("n_positions", 1024), vocab_size=cfg["vocab_size"], bias=True,
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        intermediate_size=cfg.get("n_inner") or 4 * n_embd)


def gpt2_state_dict_to_minigpt(sd: dict, config: GPTConfig, where: str = "GPT-2 weights") -> dict:
    """GPT2LMHeadModel names -> ours (same names, Conv1D weights transposed, no mask buffers)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # GPT-2's causal-mask buffers in older files
        if not k.startswith("transformer.") and k != "lm_head.weight":
            k = "transformer." + k  # GPT2Model (no head) files
        if k.endswith(_CONV1D):
            v = v.t()
        out[k] = v.contiguous()
    if "transformer.wte.weight" not in out:
        raise ValueError(f"{where}: weight 'transformer.wte.weight' (the token embedding) is "
                         "missing")
    _check_head_tie(out, "lm_head.weight", "transformer.wte.weight", where)
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def read_hf(path: str):
    """-> (GPTConfig, state dict under our names) from a Llama or GPT-2 folder."""
    where = os.path.join(path, "config.json")
    if not os.path.isfile(where):
        raise FileNotFoundError(f"no config.json in {path}")
    cfg = read_json_object(where)
    kind = cfg.get("model_type")
    try:
        if kind == "llama":
            config = llama_config_from_hf(cfg, where)
        elif kind == "gpt2":
            config = gpt2_config_from_hf(cfg, where)
        else:
            raise ValueError(f"{where}: model_type {kind!r} is not supported (llama or gpt2)")
    except KeyError as e:
        raise ValueError(f"{where}: required key {e} is missing") from e
    except (AttributeError, TypeError) as e:  # a value of the wrong JSON type
        raise ValueError(f"{where}: malformed config ({e})") from e
    sd = _read_safetensors(path)
    if kind == "llama":
        from minigpt.model import llama_state_dict_to_minigpt

        _check_tensors(sd, path)
        _check_llama_tensors(sd, config, path)
        ours = llama_state_dict_to_minigpt(sd, config)
        if config.tie_embeddings:
            ours["lm_head.weight"] = ours["transformer.wte.weight"]
    else:
        ours = gpt2_state_dict_to_minigpt(sd, config, path)
        # After the conversion: older GPT-2 files hold uint8/bool causal-mask buffers, which
        # it drops.
        _check_tensors(ours, path)
    return config, ours


def model_from_state_dict(config: GPTConfig, sd: dict, dtype=torch.float32, device="cpu") -> GPT:
    """Build a GPT holding exactly the tensors of ``sd`` (our names). Random init of 100M+
    parameters only to overwrite them is wasted time, so the model is built on the meta device
    and takes the loaded tensors as its parameters."""
    device = torch.device(device)
    sd = dict(sd)
    if config.tie_embeddings and "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()},
                              strict=True, assign=True)
    except RuntimeError as e:  # missing/unexpected keys or shape mismatches
        raise ValueError(f"weights do not fit the config: {e}") from e
    # (a tied head is tied again by GPT's load_state_dict hook: assign=True had untied it)
    if config.pos == "rope":  # non-persistent buffers are still on meta: recompute them
        from minigpt.model import rope_tables

        cos, sin = rope_tables(config.block_size, config.head_dim, config.rope_base)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"internal: {name} was not materialized while loading")
    return model.to(device=device, dtype=dtype).eval()


def load_hf(path: str, dtype=torch.float32, device="cpu"):
    """-> (GPT, tokenizer or None) from a Hugging Face folder. The tokenizer is a BPETokenizer
    from tokenizer.json, or our own checkpoint's tokenizer file when the folder came from
    ``export_hf`` of a character-level model."""
    config, sd = read_hf(path)
    model = model_from_state_dict(config, sd, dtype, device)
    tok = load_tokenizer(path)
    # Ids past the embedding would fail mid-generation; a character vocabulary (written with
    # the model by export_hf) of another size belongs to another model.
    from minigpt.tokenizer import CharTokenizer

    n, v = (tok.vocab_size if tok is not None else 0), model.config.vocab_size
    if n > v or (isinstance(tok, CharTokenizer) and n != v):
        raise ValueError(f"{path}: the tokenizer has {n} tokens but the model's vocab_size is "
                         f"{v}; the folder mixes files of different models")
    return model, tok


MINIGPT_TOKENIZER = "minigpt_tokenizer.json"


def load_tokenizer(path: str):
    """Our character tokenizer when the folder came from ``export_hf`` of a MiniGPT
    checkpoint; else a BPETokenizer from tokenizer.json; else None."""
    own = os.path.join(path, MINIGPT_TOKENIZER)
    if os.path.isfile(own):
        from minigpt.tokenizer import CharTokenizer

        return CharTokenizer.load(own)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        from minigpt.bpe import BPETokenizer

        return BPETokenizer.from_dir(path)
    return None


def char_tokenizer_json(chars) -> "Tokenizer":  # noqa: F821
    """A ``tokenizers`` Tokenizer that does exactly what our CharTokenizer does (one id per
    character, no unknown token: an unseen character is an error), so transformers'
    AutoTokenizer reads an exported char-level model's tokenizer.json with the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


# --- writing ------------------------------------------------------------------------------------

def _atomic_save(tensors: dict, path: str, metadata=None):
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
              metadata=metadata or {"format": "pt"})
    os.replace(tmp, path)


def _write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _dtype_name(model: GPT) -> str:
    return str(model.transformer.wte.weight.dtype).replace("torch.", "")


def gpt2_export_state_dict(model: GPT) -> dict:
    c = model.config
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    out = {}
    for k, v in sd.items():
        out[k] = v.t() if k.endswith(_CONV1D) else v
    if not c.bias:  # GPT-2 has biases everywhere; zeros give the same function
        z = lambda n: torch.zeros(n, dtype=model.transformer.wte.weight.dtype)  # noqa: E731
        H = c.n_embd
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            for name, n in (("ln_1.bias", H), ("ln_2.bias", H), ("attn.c_attn.bias", 3 * H),
                            ("attn.c_proj.bias", H), ("mlp.c_fc.bias", c.intermediate_size),
                            ("mlp.c_proj.bias", H)):
                out.setdefault(p + name, z(n))
        out.setdefault("transformer.ln_f.bias", z(H))
    return out


def gpt2_hf_config(config: GPTConfig, bos_id=None, eos_id=None, dtype="float32") -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size,
        "n_ctx": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
        "n_head": config.n_head, "n_inner": config.intermediate_size,
        "activation_function": "gelu",
        "layer_norm_epsilon": config.norm_eps,
        # nanoGPT's dropout sits where GPT-2's three do, the attention probabilities included
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": dtype, "torch_dtype": dtype,
    }


def llama_export_state_dict(model: GPT) -> dict:
    c = model.config
    sd = model.state_dict()
    D = c.head_dim
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = sd[p + "ln_1.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "ln_2.weight"]
        wq, wk, wv = sd[p + "attn.c_attn.weight"].split(
            [c.n_head * D, c.n_kv_head * D, c.n_kv_head * D], dim=0)
        out[q + "self_attn.q_proj.weight"] = wq
        out[q + "self_attn.k_proj.weight"] = wk
        out[q + "self_attn.v_proj.weight"] = wv
        out[q + "self_attn.o_proj.weight"] = sd[p + "attn.c_proj.weight"]
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[q + f"mlp.{n}.weight"] = sd[p + f"mlp.{n}.weight"]
    return out


def llama_hf_config(config: GPTConfig, bos_id=None, eos_id=None, dtype="float32") -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_theta": config.rope_base, "rope_type": "default"},
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        # Llama has dropout only there; ours also drops on the residual branches and embedding
        "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": dtype, "torch_dtype": dtype,
    }


def export_hf(model: GPT, out_dir: str, tokenizer=None, overwrite: bool = False) -> str:
    """Write ``model`` as a Hugging Face folder: GPT2LMHeadModel layout for the GPT family,
    LlamaForCausalLM for the Llama family. A BPETokenizer is saved as tokenizer.json; our
    CharTokenizer as both a transformers-readable tokenizer.json and, for the way back,
    minigpt_tokenizer.json. Returns ``out_dir``.

    The folder is written whole beside ``out_dir`` and then renamed into place, so no file of
    an earlier export survives into this one (a stale minigpt_tokenizer.json would be loaded
    with the new weights). A folder that exists and is not empty is replaced only with
    ``overwrite``, and only when it is a model folder (it has a config.json) that is not a
    MiniGPT training run."""
    if not isinstance(model, GPT):
        raise TypeError(f"export_hf: expected a minigpt GPT, got {type(model).__name__}")
    c = model.config
    gpt2 = (c.pos, c.norm, c.mlp) == ("learned", "layernorm", "gelu")
    llama = (c.pos, c.norm, c.mlp) == ("rope", "rmsnorm", "swiglu")
    if gpt2 and (not c.tie_embeddings or c.n_kv_head != c.n_head):
        raise ValueError("export_hf: GPT2LMHeadModel needs a tied head and n_kv_head == n_head")
    if llama and c.bias:
        raise ValueError("export_hf: LlamaForCausalLM layout has no biases; this model has them")
    if not (gpt2 or llama):
        raise ValueError(f"export_hf: no Hugging Face layout for pos={c.pos}, norm={c.norm}, "
                         f"mlp={c.mlp}; use GPT-2 (learned/layernorm/gelu) or Llama "
                         "(rope/rmsnorm/swiglu) switches")
    from minigpt.bpe import BPETokenizer
    from minigpt.tokenizer import CharTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (BPETokenizer, CharTokenizer)):
        raise TypeError(f"export_hf: cannot save a {type(tokenizer).__name__}")
    _check_export_target(out_dir, overwrite)
    final = os.path.abspath(out_dir)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{tag}")
    os.mkdir(tmp)
    try:
        _write_hf_folder(model, tmp, tokenizer, gpt2)
        old = None
        if os.path.exists(final):
            old = os.path.join(parent, f".{os.path.basename(final)}.old-{tag}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_export_target(out_dir, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export_hf: {out_dir} is a file; name the folder to write")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not overwrite:
        raise ValueError(f"export_hf: {out_dir} already exists and is not empty; replace it "
                         "with overwrite=True (minigpt export --overwrite) or choose another "
                         "folder")
    from minigpt import checkpoint as ckpt

    cfg = os.path.join(out_dir, "config.json")
    if any(os.path.exists(os.path.join(out_dir, n)) for n in (ckpt.CKPT, f"{ckpt.CKPT}.old")):
        raise ValueError(f"export_hf: {out_dir} holds a MiniGPT training run; not replacing it")
    if not os.path.isfile(cfg):
        raise ValueError(f"export_hf: {out_dir} is not a model folder (it has no config.json); "
                         "not replacing it, choose another folder")
    try:
        with open(cfg, encoding="utf-8") as f:
            fmt = json.load(f).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt == ckpt.FORMAT:
        raise ValueError(f"export_hf: {out_dir} is a MiniGPT checkpoint; not replacing it")


def _write_hf_folder(model: GPT, out_dir: str, tokenizer, gpt2: bool) -> None:
    from minigpt.bpe import BPETokenizer
    from minigpt.tokenizer import CharTokenizer

    c = model.config
    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)
    dtype = _dtype_name(model)
    if gpt2:
        _atomic_save(gpt2_export_state_dict(model), os.path.join(out_dir, "model.safetensors"))
        cfg = gpt2_hf_config(c, bos, eos, dtype)
    else:
        _atomic_save(llama_export_state_dict(model), os.path.join(out_dir, "model.safetensors"))
        cfg = llama_hf_config(c, bos, eos, dtype)
    _write_json(cfg, os.path.join(out_dir, "config.json"))
    # A list when the tokenizer stops on more than its eos (a GGUF's <|endoftext|> next to
    # <|im_end|>): from_dir and transformers' generate then stop on the same tokens as before.
    stops = [eos] * (eos is not None) + sorted(set(getattr(tokenizer, "stop_ids", ())) - {eos})
    gen = {"bos_token_id": bos, "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
    _write_json({k: v for k, v in gen.items() if v is not None},
                os.path.join(out_dir, "generation_config.json"))
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(out_dir)
    elif isinstance(tokenizer, CharTokenizer):
        tokenizer.save(os.path.join(out_dir, MINIGPT_TOKENIZER))
        char_tokenizer_json(tokenizer.chars).save(os.path.join(out_dir, "tokenizer.json"))
        _write_json({"tokenizer_class": "PreTrainedTokenizerFast",
                     "clean_up_tokenization_spaces": False,
                     "model_max_length": model.config.block_size},
                    os.path.join(out_dir, "tokenizer_config.json"))


# --- the Hub ------------------------------------------------------------------------------------

def check_hub_ready(repo_id: str, token: str | None = None) -> str:
    """The token to push with, or a clear error: bad repo id, offline mode, no token."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--push-to-hub needs a repo id like 'user/name', got {repo_id!r}")
    try:
        import huggingface_hub as hub
    except ImportError as e:
        raise RuntimeError(f"pushing to the Hub needs huggingface_hub: pip install "
                           f"huggingface_hub ({e})") from e
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise RuntimeError("cannot push to the Hugging Face Hub: offline mode is on "
                           "(HF_HUB_OFFLINE=1); unset it and try again")
    token = token or hub.get_token()
    if not token:
        raise RuntimeError("cannot push to the Hugging Face Hub: no token found; run "
                           "`huggingface-cli login` or set HF_TOKEN")
    return token


def push_to_hub(folder: str, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload ``folder`` to the Hub repo ``repo_id`` (created if needed); returns its URL.
    Every failure (no token, offline, no network, permissions) becomes one RuntimeError that
    says what to do."""
    token = check_hub_ready(repo_id, token)
    import huggingface_hub as hub

    try:
        api = hub.HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True, private=private)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id,
                                 commit_message="Upload MiniGPT export")
    except Exception as e:  # network, auth, hub errors: all end the same way for the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise RuntimeError(f"pushing {folder} to the Hugging Face Hub repo {repo_id!r} failed "
                           f"({type(e).__name__}: {first}); check your network connection and "
                           "that your token may write there") from e
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
