"""`minigpt sample`: generate text from a trained checkpoint."""
import sys

NAME = "sample"
HELP = "generate text from a `minigpt train` checkpoint (KV-cached decoding)"


def add_arguments(p):
    p.add_argument("--checkpoint", metavar="DIR", default="out/shakespeare",
                   help="a training --out directory or its checkpoint/ directory")
    p.add_argument("--prompt", default="\n", help="text to continue (its characters must be "
                   "in the checkpoint's vocabulary; default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely "
                   "(0: no limit)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling threshold in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same text)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to print")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, or 1 when the machine is already busy)")
    p.add_argument("--backend", default=None, choices=["triton", "cuda", "cpu", "torch"],
                   help="kernel backend for every op (sets MINIGPT_BACKEND)")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="print each sample when it is complete instead of as it is generated")


def run(args):
    from minigpt.commands.generate import check_sampling
    from minigpt.sampling import sample_checkpoint

    # Checked here too so the messages name the options the user typed (--top-p, not top_p),
    # and --top-k 0 is allowed: it means no limit.
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: no limit), got {args.top_k}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    check_sampling(args.max_new_tokens, args.temperature, None, args.top_p)

    sample_checkpoint(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
           temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
           seed=args.seed, num_samples=args.num_samples, device=args.device,
           backend=args.backend, stream=args.stream, out=sys.stdout, threads=args.threads)
    return 0
