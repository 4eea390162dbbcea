"""Autoregressive generation with a KV cache: prefill the prompt once, then one token per step.

Decoding choices: ``temperature`` (0 = greedy), ``top_k`` (keep the k most likely), ``top_p``
(nucleus: keep the smallest set whose probability reaches p). Randomness comes from an explicit
``torch.Generator`` (or one seeded by ``seed``), so a seed gives the same text every run.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import threading
import warnings
import weakref
from typing import Callable, Optional

import torch


def _check_args(max_new_tokens, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    # NaN fails every comparison, so `temperature < 0` would let it through to the sampler
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), "
                         f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def seeded_generator(seed, device) -> Optional[torch.Generator]:
    """A torch.Generator on ``device`` seeded with ``seed`` (None: None). The seed must be an
    integer in [0, 2**63): torch's own error for a larger one is "Overflow when unpacking
    long long"."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return torch.Generator(device=device).manual_seed(int(seed))


def tempered(logits, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (temperature > 0) in float32, shifted so the best logit is 0:
    a tiny temperature then sends the others to -inf, not every logit to +-inf (whose softmax
    is NaN). Below float32's smallest normal number (1.2e-38) only greedy's limit is left: the
    best logits 0, the others -inf. (Divided, such a temperature is a float32 subnormal, which
    flush-to-zero makes 0, and 0 / 0 is NaN; a process has flush-to-zero on once it loads code
    built with -ffast-math, as torch 2.5's Inductor CPU kernels are.)"""
    logits = logits.float()
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    if temperature < torch.finfo(torch.float32).tiny:
        return torch.zeros_like(shifted).masked_fill(shifted < 0, float("-inf"))
    return shifted / temperature


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,)."""
    # Public on its own: without these, top_k=0 or a 1-D row failed inside torch and a negative
    # temperature sampled the least likely tokens without a word.
    _check_args(0, temperature, top_k, top_p)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"sample_next: logits must be a (batch, vocab) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else logits!r}")
    # NaN (or +inf) logits come from damaged weights or an overflow in a 16-bit dtype, and a
    # row all -inf (a mask that rules out every token) leaves nothing to choose: argmax would
    # quietly pick token 0 (often the end of text), multinomial fail with torch's words. A
    # row's max is NaN, +inf or -inf in exactly these cases: one reduction and one host sync,
    # as this runs once per generated token; which case it was is worked out only on failure.
    if not bool(torch.isfinite(logits.amax(dim=-1)).all()):
        if bool(((logits != logits) | (logits == math.inf)).any()):
            raise ValueError("sample_next: the logits hold NaN or inf (damaged weights, or "
                             "values that overflow the model's dtype: try float32)")
        rows = (logits == -math.inf).all(dim=-1).nonzero()[:, 0].tolist()
        raise ValueError(f"sample_next: every logit of row(s) {rows[:10]} is -inf: no token is "
                         "left to choose (a mask that rules out the whole vocabulary?)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = tempered(logits, temperature)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the ones before it already reach top_p (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# Models inside generate() now: model -> [calls, its training mode before the first]. Each call
# saving and restoring model.training for itself went wrong with two at once (a server thread
# per request): the first to finish put a training model back in training mode while the other
# still decoded (dropout in its samples), and the last restored the "eval" it had found.
_EVAL_LOCK = threading.Lock()
_IN_GENERATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _eval_mode(model):
    """model.eval() for the block; the mode it had comes back when the last block on it ends."""
    with _EVAL_LOCK:
        held = _IN_GENERATE.get(model)
        if held is None:
            held = _IN_GENERATE[model] = [0, model.training]
        held[0] += 1
        model.eval()
    try:
        yield
    finally:
        with _EVAL_LOCK:
            held[0] -= 1
            if held[0] == 0:
                del _IN_GENERATE[model]
                model.train(held[1])


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
             eos_id: Optional[int] = None, stream: Optional[Callable] = None, use_cache=True):
    """Continue the prompts ``idx`` (B, T) (all the same length) by up to ``max_new_tokens``.

    Returns (B, T + n) token ids. ``eos_id``: a row that produced it keeps producing it, and
    generation stops once every row has. ``stream(tokens)`` is called with each step's new
    tokens (B,) as they are chosen. ``use_cache=False`` recomputes the whole window every step
    (nanoGPT's loop; slower, for checking). When the context (block_size) is full, the window
    slides: with the cache, the last half of the context is prefilled again and decoding
    continues from there."""
    _check_args(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError("generate: idx must be a (batch, time) tensor with at least one token")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"generate: seed must be an int or None, got {seed!r}")
    if stream is not None and not callable(stream):
        raise TypeError(f"generate: stream must be a callable or None, got {stream!r}")
    if generator is None:
        generator = seeded_generator(seed, idx.device)
    block = model.config.block_size
    with _eval_mode(model):
        # Room for the whole result (capped at the context) rather than always block_size:
        # a Llama with an 8k context would otherwise allocate its full cache for a short reply.
        cache = (model.new_cache(idx.shape[0], min(block, idx.shape[1] + max_new_tokens))
                 if use_cache else None)
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        window = idx[:, -block:]   # the tokens to (re)feed next
        for _ in range(max_new_tokens):
            if cache is not None and int(cache.seqlens[0]) + window.shape[1] > cache.max_seqlen:
                cache.reset()
                window = idx[:, -(block // 2 or 1):]
            if cache is None:
                window = idx[:, -block:]
            logits, _ = model(window, cache=cache, only_last=True)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            window = nxt[:, None]
            if stream is not None:
                stream(nxt)
            if eos_id is not None and bool(done.all()):
                break
        return idx


def sample_checkpoint(checkpoint, prompt="\n", max_new_tokens=500, temperature=0.8, top_k=200,
                      top_p=None, seed=1337, num_samples=1, device="auto", backend=None,
                      stream=True, out=None, threads=None) -> list[str]:
    """Load a `minigpt train` checkpoint and continue ``prompt``; prints each sample to ``out``
    (as it is generated when ``stream``) and returns them. ``threads``: CPU threads while it
    runs (default: see ``minigpt.train.cpu_threads``)."""
    import sys

    _check_args(max_new_tokens, temperature, top_k, top_p)
    seeded_generator(seed, "cpu")  # checked before the (slow) load
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(prompt, str):
        raise TypeError(f"the prompt must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("the prompt is empty; give at least one character (default: a newline)")
    from minigpt._backend import backend_env, check_backend_name, pick_device

    check_backend_name(backend)
    # else torch's lazy CUDA init fails deep inside loading with an AssertionError
    device = pick_device(device)
    out = sys.stdout if out is None else out
    from minigpt.train import threads_for_call

    # Only for this call: the ops read MINIGPT_BACKEND on every call, and a library call
    # leaves the process as it found it.
    with threads_for_call(threads, device.type == "cpu"), backend_env(backend, none_unsets=False):
        return _sample(checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                       num_samples, device, stream, out)


def _sample(checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed, num_samples,
            device, stream, out):
    from minigpt.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint, device=device)
    model, tok = ck["model"], ck["tokenizer"]
    if tok.unknown(prompt):
        bad = ", ".join(repr(c) for c in tok.unknown(prompt)[:20])
        raise ValueError(f"the prompt has characters outside the checkpoint's vocabulary: {bad}")
    if len(prompt) > model.config.block_size:
        # generate's window slides (as nanoGPT's does): said, not silent.
        warnings.warn(f"the prompt is {len(prompt)} characters, longer than the model's context "
                      f"of {model.config.block_size}: it is conditioned on the last "
                      f"{model.config.block_size}", stacklevel=3)
    idx = torch.tensor([tok.encode(prompt)], device=device)
    generator = seeded_generator(seed, device)
    texts = []
    for i in range(num_samples):
        if i:
            out.write("\n---------------\n")
        on_token = None
        if stream:
            out.write(prompt)

            def on_token(t):
                out.write(tok.decode(t.tolist()))
                out.flush()
        ids = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, generator=generator, stream=on_token)
        text = tok.decode(ids[0].tolist())
        if not stream:
            out.write(text)
        out.write("\n")
        out.flush()
        texts.append(text)
    return texts
