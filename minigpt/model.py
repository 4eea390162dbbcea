"""The MiniGPT model, top to bottom in one file, in the spirit of nanoGPT's model.py.

Every numerical building block goes through ``minigpt.ops`` (LayerNorm/RMSNorm with the
residual add fused in, attention, decode attention against a KV cache, RoPE, SwiGLU, cross
entropy), so the same model runs on the Triton, C++/CUDA or eager-PyTorch kernels. Linear
layers and embeddings are plain ``torch.nn``.

One file covers two families, chosen by switches in ``GPTConfig``:

* GPT (the default, = the seed's MiniGPT): token + learned position embeddings, pre-LayerNorm
  blocks, causal self-attention, GELU MLP, final LayerNorm, head tied to the token embedding.
* Llama: RMSNorm, rotary position embeddings (rotate-half layout, as Hugging Face Llama),
  SwiGLU MLP, grouped-query attention (``n_kv_head < n_head``), tied or untied head.
  ``GPTConfig.llama(...)`` sets those switches.

Parameter names follow nanoGPT (``transformer.h.0.attn.c_attn.weight`` ...). Mapping from a
Hugging Face ``LlamaForCausalLM`` state dict (``llama_state_dict_to_minigpt`` below does it):

    model.embed_tokens.weight                   -> transformer.wte.weight
    model.layers.{i}.input_layernorm.weight     -> transformer.h.{i}.ln_1.weight
    model.layers.{i}.self_attn.q_proj.weight  \
    model.layers.{i}.self_attn.k_proj.weight   }-> transformer.h.{i}.attn.c_attn.weight
    model.layers.{i}.self_attn.v_proj.weight  /    (rows concatenated q | k | v)
    model.layers.{i}.self_attn.o_proj.weight    -> transformer.h.{i}.attn.c_proj.weight
    model.layers.{i}.post_attention_layernorm.weight -> transformer.h.{i}.ln_2.weight
    model.layers.{i}.mlp.gate_proj.weight       -> transformer.h.{i}.mlp.gate_proj.weight
    model.layers.{i}.mlp.up_proj.weight         -> transformer.h.{i}.mlp.up_proj.weight
    model.layers.{i}.mlp.down_proj.weight       -> transformer.h.{i}.mlp.down_proj.weight
    model.norm.weight                           -> transformer.ln_f.weight
    lm_head.weight                              -> lm_head.weight (only when untied)

GPT-2 (``GPT2LMHeadModel``) uses the same names as ours for the GPT family, except that its
Conv1D weights (c_attn, c_proj, c_fc) are stored transposed.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt import ops

_NORMS = ("layernorm", "rmsnorm")
_POS = ("learned", "rope")
_MLPS = ("gelu", "swiglu")


MAX_BLOCK_SIZE = 1 << 20  # 1,048,576 positions: past every context length MiniGPT loads


@dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256          # the longest context the model can see
    dropout: float = 0.0
    vocab_size: int = 65           # set from the tokenizer when training
    bias: bool = True              # biases in Linear layers and LayerNorm (GPT-2 style)
    # Llama-family switches; the defaults give GPT.
    n_kv_head: Optional[int] = None      # grouped-query attention; None = n_head
    norm: str = "layernorm"              # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    pos: str = "learned"                 # "learned" | "rope"
    rope_base: float = 10000.0
    mlp: str = "gelu"                    # "gelu" | "swiglu"
    intermediate_size: Optional[int] = None   # None: 4 * n_embd (gelu), ~8/3 * n_embd (swiglu)
    tie_embeddings: bool = True

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive integer, got {v!r}")

        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            positive_int(name)
        if self.block_size > MAX_BLOCK_SIZE:
            # Position tables are built whole for the context: 10**12 positions failed in the
            # allocator, with a byte count rather than the setting's name.
            raise ValueError(f"GPTConfig: block_size {self.block_size:,} is beyond the "
                             f"{MAX_BLOCK_SIZE:,} positions MiniGPT supports (a damaged config?)")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head "
                             f"({self.n_head})")
        for name in ("bias", "tie_embeddings"):  # the string "false" from a JSON file is truthy
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig: {name} must be true or false, got "
                                 f"{getattr(self, name)!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        positive_int("n_kv_head")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.n_kv_head})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout!r}")
        for name, choices in (("norm", _NORMS), ("pos", _POS), ("mlp", _MLPS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"GPTConfig: {name} must be one of {choices}, "
                                 f"got {getattr(self, name)!r}")
        # A string failed with "'>' not supported"; inf passed here and only the norm op,
        # at the first forward, refused it.
        if (isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float))
                or not 0 < self.norm_eps < math.inf):
            raise ValueError(f"GPTConfig: norm_eps must be a finite positive number, got "
                             f"{self.norm_eps!r}")
        if self.pos == "rope":
            if self.head_dim % 2:
                raise ValueError(f"GPTConfig: rotary embeddings need an even head_dim, got "
                                 f"{self.head_dim}")
            if (isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float))
                    or not 1 < self.rope_base < math.inf):  # inf: every angle 0 but the first
                raise ValueError(f"GPTConfig: rope_base must be a finite number > 1, got "
                                 f"{self.rope_base!r}")
        if self.intermediate_size is None:
            if self.mlp == "gelu":
                self.intermediate_size = 4 * self.n_embd
            else:  # Llama's 2/3 of 4x keeps SwiGLU's three matrices at GELU's parameter count
                self.intermediate_size = 32 * math.ceil(8 * self.n_embd / 3 / 32)
        positive_int("intermediate_size")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def llama(cls, **kwargs) -> "GPTConfig":
        """A Llama-family config: RMSNorm, RoPE, SwiGLU, no biases; override anything."""
        kw = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, norm_eps=1e-5)
        kw.update(kwargs)
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def dropout(p: float) -> nn.Module:
    # Without dropout, no module that calls F.dropout ~120 times per decode step to do nothing.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Norm(nn.Module):
    """LayerNorm or RMSNorm with the pre-norm residual add fused in:
    ``forward(x, residual)`` returns ``(norm(x + residual), x + residual)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind, self.eps = config.norm, config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        use_bias = config.bias and config.norm == "layernorm"
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if use_bias else None

    def forward(self, x, residual=None):
        # Under autocast the branches come back in bf16 while the residual stream stays fp32
        # (as in nanoGPT, where `x + bf16` promotes): the ops add them in fp32 and keep h fp32.
        # The normalized output goes straight to a matmul, which autocast would feed in its
        # dtype: the kernel writes it in that dtype (the same values, one copy fewer).
        dev = x.device.type
        out_dtype = (torch.get_autocast_dtype(dev)
                     if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) else None)
        if self.kind == "layernorm":
            out = ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual,
                                 out_dtype=out_dtype)
        else:
            out = ops.rms_norm(x, self.weight, self.eps, residual=residual, out_dtype=out_dtype)
        return out if residual is not None else (out, x)


class KVCache:
    """Keys and values of every layer, preallocated: (B, n_kv_head, max_seqlen, head_dim) each,
    plus ``seqlens`` (B,) int32, how many positions of each row are filled.

    A forward pass with T > 1 tokens (prefill) appends a block at the rows' common length; a
    pass with one token (decode) writes it at each row's own length and attends with
    ``ops.decode_attention``. A decode step checks for overflow once (one host sync), except
    while a CUDA graph is captured: the captured step syncs nothing, and its replays do not
    check (the caller, e.g. generate, knows the lengths)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_seqlen: Optional[int] = None,
                 device=None, dtype=torch.float32):
        max_seqlen = config.block_size if max_seqlen is None else max_seqlen
        for name, v in (("batch_size", batch_size), ("max_seqlen", max_seqlen)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"KVCache: {name} must be an int, got {v!r}")
        if not 1 <= max_seqlen <= config.block_size:
            raise ValueError(f"KVCache: max_seqlen must be in [1, block_size={config.block_size}]"
                             f", got {max_seqlen}")
        if batch_size < 1:
            raise ValueError(f"KVCache: batch_size must be >= 1, got {batch_size}")
        shape = (batch_size, config.n_kv_head, max_seqlen, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.batch_size, self.max_seqlen = batch_size, max_seqlen
        self._start = 0          # prefill: where this block starts
        self._decode = False
        self._decode_lens = None  # decode: seqlens including the token being written
        self._slots = None        # decode: rows of the (B * Hkv * max_seqlen, D) view to write

    def reset(self):
        self.seqlens.zero_()

    def _begin(self, T: int):
        """Called by the model before the layers; returns the positions of the new tokens:
        a python int (start of the block) for prefill, a (B, 1) tensor for decode."""
        self._decode = T == 1
        if self._decode:
            # One check per step rather than one per layer in decode_attention (a host sync on
            # a GPU; skipped while a CUDA graph is captured, where syncing is not allowed).
            if ops.host_checks(self.seqlens):
                longest = int(self.seqlens.max())
                if longest >= self.max_seqlen:
                    raise ValueError(f"KVCache: a sequence already holds {longest} tokens, the "
                                     f"cache's capacity of {self.max_seqlen}; no room for one more")
            # Computed once per step, not per layer: a decode step is latency-bound and every
            # small op counts.
            self._decode_lens = self.seqlens + 1
            pos = self.seqlens.long()
            heads = torch.arange(self.batch_size * self.k[0].shape[1], device=pos.device)
            self._slots = heads * self.max_seqlen + pos.repeat_interleave(self.k[0].shape[1])
            return pos[:, None]
        lens = self.seqlens.tolist()
        if len(set(lens)) != 1:
            raise ValueError(f"KVCache: a block of {T} tokens needs every row at the same "
                             f"length, got lengths {lens}")
        self._start = lens[0]
        if self._start + T > self.max_seqlen:
            raise ValueError(f"KVCache: {self._start} cached + {T} new tokens exceed its "
                             f"capacity of {self.max_seqlen}")
        return self._start

    def _update(self, layer: int, k, v):
        """Store this layer's new keys/values (B, Hkv, T, D); return what attention reads."""
        kc, vc = self.k[layer], self.v[layer]
        if k.dtype != kc.dtype and torch.promote_types(k.dtype, kc.dtype) != kc.dtype:
            # Stored, the keys would be rounded to the cache's dtype without a word.
            raise ValueError(f"KVCache: the cache holds {kc.dtype} but the model's keys are "
                             f"{k.dtype}; make it with model.new_cache() where it is used "
                             "(inside autocast, or after a change of the model's dtype)")
        if self._decode:
            D = kc.shape[-1]
            kc.view(-1, D).index_copy_(0, self._slots, k.reshape(-1, D).to(kc.dtype))
            vc.view(-1, D).index_copy_(0, self._slots, v.reshape(-1, D).to(vc.dtype))
            return kc, vc
        end = self._start + k.shape[2]
        kc[:, :, self._start:end] = k
        vc[:, :, self._start:end] = v
        return kc[:, :, :end], vc[:, :, :end]

    def _end(self, T: int):
        self.seqlens += T


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k and v projections in one matrix (rows q | k | v; k and v are smaller with GQA)
        qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        # Dropout as nanoGPT's: on the attention probabilities (its SDPA dropout_p, here
        # ops.attention's, training path only) and on the branch output (resid_dropout).
        self.attn_dropout = config.dropout
        self.resid_dropout = dropout(config.dropout)

    def forward(self, x, rope=None, cache: Optional[KVCache] = None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x)
        if rope is None and cache is None:
            # The whole projection in one op: its backward returns one gradient for c_attn
            # instead of three that a split would have to concatenate.
            y = ops.attention_qkv(qkv, H, Hkv, causal=True,
                                  dropout_p=self.attn_dropout if self.training else 0.0)
            return self.resid_dropout(self.c_proj(y))
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)      # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)    # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if rope is not None:
            cos, sin, position_ids = rope
            q, k = ops.rope(q, k, cos, sin, position_ids)
        if cache is None:
            y = ops.attention(q, k, v, causal=True,
                              dropout_p=self.attn_dropout if self.training else 0.0)
        else:
            k, v = cache._update(self.layer_idx, k, v)
            if k.dtype != q.dtype:
                # A wider cache than the keys (float32 made outside autocast, used under it)
                # holds them exactly: attention runs in q's dtype, as it does without a cache.
                k, v = k.to(q.dtype), v.to(q.dtype)
            if cache._decode:
                # The cache keeps the lengths in range; checking them would cost a GPU a
                # host sync in every layer.
                y = ops.decode_attention(q, k, v, cache._decode_lens, check_lengths=False)
            else:  # the new block's queries see the whole cached prefix (causal, end-aligned)
                y = ops.attention(q, k, v, causal=True)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU: c_proj(gelu(c_fc(x))). SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        C, I = config.n_embd, config.intermediate_size
        if self.kind == "gelu":
            self.c_fc = nn.Linear(C, I, bias=config.bias)
            self.c_proj = nn.Linear(I, C, bias=config.bias)
        else:
            self.gate_proj = nn.Linear(C, I, bias=config.bias)
            self.up_proj = nn.Linear(C, I, bias=config.bias)
            self.down_proj = nn.Linear(I, C, bias=config.bias)
        self.dropout = dropout(config.dropout)

    def forward(self, x):
        if self.kind == "gelu":
            x = self.c_proj(F.gelu(self.c_fc(x)))
        else:
            x = self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.dropout(x)


class Block(nn.Module):
    """Pre-norm transformer block. It passes the residual stream and the branch output
    separately so each norm can fuse "add the branch, then normalize" into one kernel:
    (x, residual) -> (mlp output, residual before the mlp)."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = Norm(config)
        self.mlp = MLP(config)

    def forward(self, x, residual, rope=None, cache=None):
        h, residual = self.ln_1(x, residual)          # residual = x + residual
        x = self.attn(h, rope, cache)
        h, residual = self.ln_2(x, residual)
        return self.mlp(h), residual


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=Norm(config),
        ))
        if config.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rope_tables(config.block_size, config.head_dim, config.rope_base)
            # Not saved in checkpoints: recomputed from the config.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
            self.register_load_state_dict_post_hook(_retie_head)

        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _apply(self, fn, recurse=True):
        # The rope tables are buffers that no state dict restores: a round trip through a
        # narrower dtype (.to(bfloat16).to(float32)) kept bf16's rounding in them. Rebuilt
        # from the config, they are exact in whatever dtype and device the move gives.
        before = getattr(self, "rope_cos", None)
        out = super()._apply(fn, recurse)
        # A move that changed nothing keeps the same tensors (a CUDA graph captured on them
        # stays valid).
        rope = self.config.pos == "rope"
        if rope and self.rope_cos is not before and not self.rope_cos.is_meta:
            cos, sin = rope_tables(self.config.block_size, self.config.head_dim,
                                   self.config.rope_base)
            kw = dict(device=self.rope_cos.device, dtype=self.rope_cos.dtype)
            self.rope_cos, self.rope_sin = cos.to(**kw), sin.to(**kw)
        return out

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True) -> int:
        """Parameter count; by default without the position embeddings (nanoGPT's
        convention; the token embedding counts because the head shares it)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache: Optional[KVCache] = None, only_last=False):
        """idx (B, T) token ids -> (logits (B, T, vocab) or None, loss or None).

        With ``targets`` (B, T) the loss is the mean cross entropy, computed by
        ``ops.fused_linear_cross_entropy`` straight from the last hidden state, so the (B, T,
        vocab) logits are never formed and ``logits`` is None. Targets of -100 are left out
        (PyTorch's ``ignore_index``; nanoGPT's -1 is an out-of-range error here). With
        ``cache`` the tokens continue the cached sequences. ``only_last`` returns logits for
        the last position only (B, 1, vocab), all that sampling needs."""
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"GPT: idx must be a tensor of token ids, got {type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):  # what nn.Embedding takes
            raise TypeError(f"GPT: idx must hold token ids as int64 or int32, got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"GPT: idx must be (batch, time) token ids, got shape "
                             f"{tuple(idx.shape)}")
        B, T = idx.shape
        if T == 0:
            raise ValueError("GPT: idx has no tokens")
        # An id outside the vocabulary is an opaque IndexError from the embedding on the CPU and
        # a device-side assert on CUDA, which ruins the process's CUDA context: checked here,
        # one host sync on a GPU (not while compiling, capturing a CUDA graph or in
        # ops.no_host_sync()). A one-token step after a cache on CUDA is left to the
        # embedding's assert: its id comes from the sampler, and a sync per generated token
        # would cost decoding speed.
        decode_step = idx.is_cuda and cache is not None and T == 1
        if (idx.numel() and idx.device.type != "meta" and not decode_step
                and ops.host_checks(idx)):
            lo, hi = (int(v) for v in torch.aminmax(idx))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"GPT: token ids must lie in [0, {self.config.vocab_size}) (the "
                                 f"vocabulary), got values in [{lo}, {hi}]")
        if cache is not None:
            self._check_cache(cache, B)
        start = cache._begin(T) if cache is not None else 0
        if isinstance(start, int) and start + T > self.config.block_size:
            raise ValueError(f"GPT: cannot forward a sequence of {start + T} tokens, the block "
                             f"size (context) is only {self.config.block_size}")

        x = self.transformer.wte(idx)
        rope = None
        if isinstance(start, int):     # a block of tokens at positions start .. start+T-1
            positions = torch.arange(start, start + T, device=idx.device)
        else:                          # one token per row, each at its own position (B, 1)
            positions = start
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(positions)
        elif isinstance(start, int):
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T], None)
        else:  # each row's angles, gathered once here rather than in each layer: (B, 1, D)
            rope = (self.rope_cos[positions], self.rope_sin[positions], None)
        x = self.transformer.drop(x)

        residual = None
        for block in self.transformer.h:
            x, residual = block(x, residual, rope, cache)
        x, _ = self.transformer.ln_f(x, residual)
        if cache is not None:
            cache._end(T)

        if targets is not None:
            # lm_head and the loss in one op that never holds the (tokens, vocab) logits; under
            # autocast its matmuls run in bf16/fp16 like self.lm_head's would, the loss in fp32.
            loss = ops.fused_linear_cross_entropy(x, self.lm_head.weight, targets)
            return None, loss
        if only_last:
            x = x[:, -1:, :]
        return self.lm_head(x), None

    def _check_cache(self, cache, B: int):
        # A cache made for another batch or model failed deep in a layer with torch's
        # "The expanded size of the tensor ... must match".
        if not isinstance(cache, KVCache):
            raise TypeError(f"GPT: cache must be a KVCache, got {type(cache).__name__}")
        if cache.batch_size != B:
            raise ValueError(f"GPT: the cache holds {cache.batch_size} sequences but idx has {B}")
        c = self.config
        want = (c.n_layer, c.n_kv_head, c.head_dim)
        got = (len(cache.k), cache.k[0].shape[1], cache.k[0].shape[3])
        if got != want:
            raise ValueError(f"GPT: the cache was made for another model: (layers, kv heads, "
                             f"head_dim) {got}, this model has {want}")
        if cache.max_seqlen > c.block_size:
            # Decoding past the context then failed in the position lookup (an IndexError).
            raise ValueError(f"GPT: the cache was made for another model: it holds "
                             f"{cache.max_seqlen} positions, this model's context is "
                             f"{c.block_size}")

    def new_cache(self, batch_size: int, max_seqlen: Optional[int] = None) -> KVCache:
        """An empty KV cache on the model's device, in the dtype of its keys and values: the
        weights', or under autocast autocast's (the projections' output then, as in attention
        without a cache)."""
        p = self.transformer.wte.weight
        dtype, dev = p.dtype, p.device.type
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
        return KVCache(self.config, batch_size, max_seqlen, device=p.device, dtype=dtype)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, seed=None, eos_id=None, stream=None, use_cache=True):
        """Continue ``idx`` (B, T); see minigpt.sampling.generate."""
        from minigpt.sampling import generate

        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, generator=generator, seed=seed, eos_id=eos_id,
                        stream=stream, use_cache=use_cache)

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95),
                             device_type="cpu", capturable=False):
        """AdamW with weight decay on matrices and embeddings, none on biases and norms.

        ``capturable``: for a step captured in a CUDA graph (minigpt/graph.py): the step count
        and the learning rate live on the GPU, the latter as a tensor in each group (set it
        with ``minigpt.graph.set_lr``). CUDA only."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        extra = {}
        if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
            extra["fused"] = True
        if capturable:
            if device_type != "cuda":
                raise ValueError(f"configure_optimizers: capturable needs CUDA, not {device_type}")
            dev = next(iter(params.values())).device
            extra["capturable"] = True
            # One tensor per group: the optimizer may move a shared one to each group's device.
            lr = [torch.tensor(float(learning_rate), device=dev) for _ in range(2)]
        else:
            lr = [learning_rate] * 2
        groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr[0]},
                  {"params": no_decay, "weight_decay": 0.0, "lr": lr[1]}]
        return torch.optim.AdamW(groups, lr=lr[0], betas=betas, **extra)


MiniGPT = GPT


def _retie_head(model: "GPT", incompatible_keys) -> None:
    """load_state_dict post-hook of a tied model: ``assign=True`` (the way to load into a model
    built on the meta device) replaces the head's and the embedding's Parameter separately,
    leaving two parameters over one storage that AdamW then stepped twice."""
    model.lm_head.weight = model.transformer.wte.weight


def rope_tables(n_positions: int, head_dim: int, base: float = 10000.0):
    """cos, sin (n_positions, head_dim) in float32, halves repeated (rotate-half layout):
    position p, frequency i: angle p * base^(-2i/head_dim), as Hugging Face Llama."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def llama_state_dict_to_minigpt(sd: dict, config: GPTConfig) -> dict:
    """Rename (and fuse q|k|v of) a Hugging Face LlamaForCausalLM state dict to ours; see the
    table at the top of this file. ``rotary_emb.inv_freq`` buffers are dropped."""
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"]}
    for i in range(config.n_layer):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        out[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            parts = [sd.get(f"{p}self_attn.{n}_proj.{kind}") for n in "qkv"]
            if all(t is not None for t in parts):
                out[f"{q}attn.c_attn.{kind}"] = torch.cat(parts, dim=0)
            if f"{p}self_attn.o_proj.{kind}" in sd:
                out[f"{q}attn.c_proj.{kind}"] = sd[f"{p}self_attn.o_proj.{kind}"]
            for n in ("gate_proj", "up_proj", "down_proj"):
                if f"{p}mlp.{n}.{kind}" in sd:
                    out[f"{q}mlp.{n}.{kind}"] = sd[f"{p}mlp.{n}.{kind}"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out
