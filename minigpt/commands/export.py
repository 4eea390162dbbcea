"""minigpt export: write a model in another format.

    minigpt export --checkpoint out/shakespeare --format hf --out hf/shakespeare
        -> a folder transformers.GPT2LMHeadModel.from_pretrained reads (logits equal ours)
    minigpt export --checkpoint smollm2 --format hf --out hf/smollm2
        -> LlamaForCausalLM layout (Llama-family models)
    minigpt export --checkpoint hf/shakespeare --format minigpt --out out/imported
        -> back to a MiniGPT checkpoint that `minigpt sample` reads
    ... --push-to-hub user/name   uploads the written folder (needs a token and network)
"""
from __future__ import annotations

import os
import sys

NAME = "export"
HELP = "export a model as a Hugging Face folder (GPT-2 or Llama layout) or import one back"


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, metavar="SRC",
                   help="what to export: a minigpt checkpoint / run directory, a Hugging Face "
                        "folder, a .gguf file or a packaged model name (smollm2)")
    p.add_argument("--format", choices=["hf", "minigpt"], default="hf",
                   help="hf: a transformers folder; minigpt: a MiniGPT checkpoint (import)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="also upload the folder to this Hugging Face Hub repo (user/name)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out already holds (an earlier export or checkpoint); "
                        "never the source")


def _overlaps_source(src, out) -> bool:
    """``out`` is the source, a folder inside it, or a folder that holds it: writing there
    (or replacing it) would destroy what is being exported. A checkpoint's source counts as
    its run folder, which holds checkpoint/."""
    if not os.path.exists(src):
        return False  # a packaged model's name
    out = os.path.realpath(out)
    srcs = {os.path.realpath(src)}
    from minigpt import checkpoint as ckpt

    try:
        d = ckpt.resolve(src)
    except (OSError, ValueError):
        d = None
    if d is not None:
        srcs.add(os.path.realpath(d))
        if d.name in (ckpt.CKPT, f"{ckpt.CKPT}.old"):
            srcs.add(os.path.realpath(d.parent))
    return any(out == s or out.startswith(s + os.sep) or s.startswith(out + os.sep)
               for s in srcs)


def run(args) -> int:
    import minigpt
    from minigpt import hf

    if _overlaps_source(args.checkpoint, args.out):
        raise ValueError("--out must differ from --checkpoint and lie outside it (it would "
                         "overwrite the source)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; --out names the folder to write")
    if args.format == "minigpt":  # before the (possibly long) load
        from minigpt import checkpoint as ckpt

        problem = ckpt.run_dir_problem(args.out)
        if problem:
            raise ValueError(f"--out {problem}")
        held = ckpt.existing_checkpoint(args.out)
        if held and not args.overwrite:
            raise ValueError(f"--out {args.out} already holds {held}; replace it with "
                             "--overwrite or choose another folder")
    elif os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out} already exists and is not empty; replace it with "
                         "--overwrite or choose another folder")
    if args.push_to_hub is not None and args.format != "hf":
        raise ValueError("--push-to-hub uploads Hugging Face folders: use it with --format hf")
    if args.push_to_hub is not None:  # fail before the (possibly long) export, not after
        hf.check_hub_ready(args.push_to_hub)
    model, tokenizer = minigpt.load(args.checkpoint, dtype=args.dtype, device="cpu")
    if args.format == "hf":
        hf.export_hf(model, args.out, tokenizer, overwrite=args.overwrite)
        print(f"wrote {args.out} ({'GPT2LMHeadModel' if model.config.pos == 'learned' else 'LlamaForCausalLM'} "
              f"layout, {sum(p.numel() for p in model.parameters()):,} parameters)")
        if args.push_to_hub:
            url = hf.push_to_hub(args.out, args.push_to_hub, private=args.private)
            print(f"uploaded to {url}")
    else:
        from minigpt.checkpoint import save_checkpoint
        from minigpt.tokenizer import CharTokenizer

        if not isinstance(tokenizer, CharTokenizer):
            raise ValueError("--format minigpt writes MiniGPT checkpoints, which hold a character "
                             f"tokenizer; {args.checkpoint} has "
                             f"{type(tokenizer).__name__ if tokenizer else 'no tokenizer'}")
        path = save_checkpoint(args.out, model.float(), tokenizer,
                               train_state={"imported_from": os.path.abspath(args.checkpoint)})
        print(f"wrote {path}")
    sys.stdout.flush()
    return 0
