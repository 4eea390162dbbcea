"""Run a Hugging Face transformers Llama on minigpt.ops: one call swaps its RMSNorm, rotary
embedding, MLP, attention and loss for our fused ops.

    from transformers import LlamaForCausalLM
    from minigpt.patch import apply_to_llama, revert

    model = LlamaForCausalLM.from_pretrained(...)
    apply_to_llama(model)                  # every op; backend=None picks the best per device
    loss = model(input_ids, labels=labels).loss   # training: fused linear cross-entropy
    revert(model)                          # exactly the original model again

How (the approach of Liger-Kernel's ``apply_liger_kernel_to_llama(model=...)``): each matching
submodule of *this model instance* gets its own ``forward`` bound in its ``__dict__``, which
shadows the class's method. Nothing in transformers' modules, classes or global tables is
changed, so other models in the process are untouched, and ``revert`` deletes the bound methods.
The replacement forwards mirror transformers' Llama code (5.x, and 4.57 where it differs):

* ``LlamaRMSNorm``  -> ``ops.rms_norm`` (the weight multiplies in float32 before the cast back
  to the input dtype; transformers multiplies after it, so bf16 results differ by rounding).
* ``LlamaMLP``      -> ``down_proj(ops.swiglu(gate_proj(x), up_proj(x)))`` (silu models only).
* ``LlamaAttention``-> projections, ``ops.rope`` on q and k, then ``ops.attention(causal=True)``
  whenever the mask is purely causal (no padding); a padding mask, attention dropout or
  ``output_attentions`` fall back to transformers' own attention function for that call, as
  does a mask tensor under torch.compile (its values are not known while tracing).
  transformers 5 leaves the mask out of a compiled SDPA model on torch 2.13, so ours runs
  there; on torch 2.11 it passes a 4-D causal mask, and the compiled model runs its SDPA.
* ``LlamaForCausalLM`` -> in training with labels, the loss comes from
  ``ops.fused_linear_cross_entropy`` on the last hidden states, so the (tokens, vocab) logits are
  never formed and ``output.logits`` is None (pass ``skip_logits=False`` to get them); otherwise
  logits are computed and the loss uses ``ops.cross_entropy``. Labels are shifted as
  transformers does (``shift_labels``, ``ignore_index`` and ``num_items_in_batch`` work too).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from minigpt import ops as _ops

# transformers is imported here, not inside the replacement forwards: ``transformers`` and
# ``transformers.models.llama`` are lazy modules (transformers' _LazyModule), and Dynamo of
# torch 2.11 (the GPU image's) refuses to import one inside a traced function ("Bad import
# result"), so torch.compile(fullgraph=True) of a patched model failed there (2.13 allows it).
try:
    from transformers import modeling_utils as _modeling_utils
    from transformers.cache_utils import Cache as _Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.llama import modeling_llama as _ml
except ImportError as _e:  # apply_to_llama says what is missing
    _ml = None
    _IMPORT_ERROR = _e

_ATTR = "_minigpt_patch"  # on every patched module: the names bound in its __dict__


def _bind(module, name, fn):
    # A partial of a module-level function, not a bound method: pickle stores a bound method
    # as getattr(module, fn.__name__), which no module has, so torch.save of a patched model
    # wrote a file that could not be loaded back.
    module.__dict__[name] = functools.partial(fn, module)
    getattr(module, "__dict__").setdefault(_ATTR, []).append(name)


# ----------------------------------------------------------------------------------------------
# Replacement forwards (``self`` is the transformers module)


def _rms_norm_forward(self, hidden_states):
    return _ops.rms_norm(hidden_states, self.weight, self.variance_epsilon,
                         backend=self._minigpt_backend)


def _mlp_forward(self, x):
    return self.down_proj(_ops.swiglu(self.gate_proj(x), self.up_proj(x),
                                      backend=self._minigpt_backend))


# The decoder layers of one forward share a mask tensor: decide "purely causal?" once for it.
# One tuple (mask, its version, the answer), replaced whole: a mask refilled in place (one
# buffer reused for each batch of packed documents) has a new version, and two threads never
# pair one mask with the other's answer.
_mask_memo: list = [(None, -1, False)]


def _mask_is_causal(mask: Optional[torch.Tensor], T: int, S: int) -> bool:
    """True when ``mask`` lets query i see exactly keys j <= i + S - T (what
    ``ops.attention(causal=True)`` does): no padding, no other restriction."""
    if mask is None:
        # transformers leaves the mask out for SDPA's is_causal, which aligns top-left: the
        # same as ours only when T == S (T == 1: no mask at all). It does so for T < S on an
        # empty static cache (transformers 5), whose keys past T are empty slots.
        return T == 1 or T == S
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2:] != (T, S):
        return False
    if torch.compiler.is_compiling():
        # Deciding needs the mask's values, which a traced graph does not have (Dynamo of
        # torch 2.11 refused the bool() under fullgraph=True; transformers passes a mask
        # there that 2.13 leaves out): transformers' own attention takes the mask as it is.
        return False
    # Inference-mode tensors keep no version counter (and cannot be written outside it).
    now = None if mask.is_inference() else mask._version
    ref, version, causal = _mask_memo[0]
    if ref is not None and ref() is mask and version == now:
        return causal
    allowed = mask if mask.dtype == torch.bool else mask == 0  # additive masks: 0 = attend
    i = torch.arange(T, device=mask.device).unsqueeze(1)
    j = torch.arange(S, device=mask.device).unsqueeze(0)
    causal = bool((allowed == (j <= i + (S - T))).all())
    _mask_memo[0] = (weakref.ref(mask), now, causal)
    return causal


# True for transformers < 5, whose ``Cache.update(k, v, layer_idx, cache_kwargs)`` takes the
# RoPE tables and ``cache_position`` in a dict (5.x: ``update(..., kwargs=...)``).
_LEGACY_CACHE_UPDATE = (_ml is not None
                        and "cache_kwargs" in inspect.signature(_Cache.update).parameters)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       cache=None, past_key_values=None, **kwargs):
    be = self._minigpt_backend
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    if self._minigpt_rope:
        q, k = _ops.rope(q, k, cos, sin, backend=be)
    else:
        q, k = _ml.apply_rotary_pos_emb(q, k, cos, sin)

    # transformers < 5 calls the cache past_key_values and takes cache_position as a parameter
    # of its own (so it never reaches the attention function).
    legacy = _LEGACY_CACHE_UPDATE
    cache_position = kwargs.pop("cache_position", None) if legacy else None
    cache = cache if cache is not None else past_key_values
    if cache is not None:
        if legacy:
            k, v = cache.update(k, v, self.layer_idx,
                                {"sin": sin, "cos": cos, "cache_position": cache_position})
        else:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)

    dropout = self.attention_dropout if self.training else 0.0
    # transformers 5 makes a Llama bidirectional with model(..., is_causal=False) or
    # config.is_causal = False: no mask then reaches us, only this flag, which transformers'
    # attention functions read the same way.
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(self, "is_causal", True)
    if (self._minigpt_attention and dropout == 0.0 and not kwargs.get("output_attentions")
            and is_causal and _mask_is_causal(attention_mask, q.shape[2], k.shape[2])):
        out = _ops.attention(q, k, v, causal=True, scale=self.scaling, backend=be).transpose(1, 2)
        weights = None
    else:
        impl = self.config._attn_implementation
        table = _ml.ALL_ATTENTION_FUNCTIONS
        fn = (table.get_interface(impl, _ml.eager_attention_forward)
              if hasattr(table, "get_interface") else
              _ml.eager_attention_forward if impl == "eager" else table[impl])
        out, weights = fn(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling,
                          **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _keep(hidden, logits_to_keep):
    # transformers 5 also takes per-sample 2-D positions or a mask (slice_logits_to_keep).
    if hasattr(_modeling_utils, "slice_logits_to_keep"):
        return _modeling_utils.slice_logits_to_keep(hidden, logits_to_keep)
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    return hidden[:, logits_to_keep, :]


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                       inputs_embeds=None, labels=None, logits_to_keep=0, skip_logits=None,
                       **kwargs):
    be = self._minigpt_backend
    return_dict = kwargs.pop("return_dict", None)
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
    hidden = _keep(outputs[0], logits_to_keep)

    has_labels = labels is not None or shift_labels is not None
    if has_labels and shift_labels is None:
        # Position t predicts token t + 1; the last position has nothing to predict.
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if skip_logits is None:
        skip_logits = self.training and has_labels
    if skip_logits and not has_labels:
        raise ValueError("apply_to_llama: skip_logits=True needs labels or shift_labels")
    reduction = "sum" if num_items_in_batch is not None else "mean"

    loss = logits = None
    if skip_logits:
        weight = self.lm_head.weight
        loss = _ops.fused_linear_cross_entropy(
            hidden.to(weight.dtype), weight, shift_labels.to(hidden.device), self.lm_head.bias,
            ignore_index=ignore_index, reduction=reduction, backend=be)
    else:
        logits = self.lm_head(hidden)
        if has_labels:
            loss = _ops.cross_entropy(logits, shift_labels.to(logits.device),
                                      ignore_index=ignore_index, reduction=reduction, backend=be)
    if loss is not None and num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch

    extra = {name: getattr(outputs, name, None) for name in self._minigpt_cache_fields}
    out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions, **extra)
    if return_dict is False:
        return out.to_tuple()
    return out


# ----------------------------------------------------------------------------------------------
# Public API


def apply_to_llama(model, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
                   attention: bool = True, cross_entropy: bool = True,
                   backend: Optional[str] = None):
    """Swap the chosen parts of a transformers ``LlamaForCausalLM`` (or ``LlamaModel``) for
    minigpt.ops, in place, on this instance only; returns the model. ``backend`` is passed to
    every op ("triton", "cuda", "cpu", "torch", or None for the best per device). Calling it
    again re-patches from scratch; ``revert(model)`` undoes it."""
    if _ml is None:
        raise ImportError(f"apply_to_llama needs transformers ({_IMPORT_ERROR})")
    if not isinstance(model, _ml.LlamaPreTrainedModel):
        raise TypeError(f"apply_to_llama: expected a transformers Llama model "
                        f"(LlamaForCausalLM or LlamaModel), got {type(model).__name__}")
    if backend is not None:
        from minigpt import _backend

        _backend.check_backend_name(backend, "apply_to_llama")  # " CPU " as the ops take it
    revert(model)
    for m in model.modules():
        if isinstance(m, _ml.LlamaRMSNorm) and rms_norm:
            _bind(m, "forward", _rms_norm_forward)
        elif isinstance(m, _ml.LlamaMLP) and swiglu:
            if not isinstance(m.act_fn, torch.nn.SiLU) and model.config.hidden_act not in (
                    "silu", "swish"):
                continue  # swiglu is silu(gate) * up only; other activations stay as they are
            _bind(m, "forward", _mlp_forward)
        elif isinstance(m, _ml.LlamaAttention) and (rope or attention):
            m.__dict__["_minigpt_rope"] = rope
            m.__dict__["_minigpt_attention"] = attention
            _bind(m, "forward", _attention_forward)
        elif isinstance(m, _ml.LlamaForCausalLM) and cross_entropy:
            # Which cache field this transformers' output has, found here: Dynamo cannot trace
            # dataclasses.fields, and torch.compile(fullgraph=True) of the forward failed.
            names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
            m.__dict__["_minigpt_cache_fields"] = tuple(
                n for n in ("cache", "past_key_values") if n in names)
            _bind(m, "forward", _causal_lm_forward)
        else:
            continue
        m.__dict__["_minigpt_backend"] = backend
    return model


def revert(model):
    """Undo ``apply_to_llama`` on ``model`` (a no-op for an unpatched model); returns it."""
    for m in model.modules():
        names = m.__dict__.pop(_ATTR, None)
        if names is None:
            continue
        for name in names:
            m.__dict__.pop(name, None)
        for attr in ("_minigpt_backend", "_minigpt_rope", "_minigpt_attention",
                     "_minigpt_cache_fields"):
            m.__dict__.pop(attr, None)
    return model


def is_patched(model) -> bool:
    return any(_ATTR in m.__dict__ for m in model.modules())
