"""`minigpt inspect`: what a model is made of: config, parameters by part, memory, and its size
next to GPT-2 and GPT-3."""

NAME = "inspect"
HELP = "show a model's config, parameter counts by part and size next to GPT-2/GPT-3"


def add_arguments(p):
    from minigpt.inspect import add_source_arguments

    add_source_arguments(p, device=False)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the dtype the weights would be loaded in (memory column)")


def run(args):
    from minigpt.inspect import inspect_report, load_info
    from minigpt.loaders import parse_dtype

    print(inspect_report(load_info(args.checkpoint, args.model, parse_dtype(args.dtype))))
    return 0
