"""`minigpt attention`: a heatmap of who attends to whom, for one head or every head of a layer,
and for each token the keys it attends to most."""

NAME = "attention"
HELP = "draw a PNG heatmap of attention weights (queries x keys) for a prompt"


def add_arguments(p):
    from minigpt.inspect import add_source_arguments

    add_source_arguments(p)
    p.add_argument("--prompt", required=True, help="the text whose attention to draw")
    p.add_argument("--layer", type=int, default=0, help="which layer (0 = first, -1 = last)")
    p.add_argument("--head", type=int, default=None,
                   help="one head; default: a grid of all heads of the layer")
    p.add_argument("--out", default=None,
                   help="PNG file to write (default: attention_L<layer>[_H<head>].png)")
    p.add_argument("--top", type=int, default=3, help="keys to list per token")


def run(args):
    from minigpt.inspect import (attention_maps, model_from_args, plot_attention,
                                 top_keys_report)

    if not args.prompt:
        raise ValueError("--prompt is empty: give at least one character")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    model, tok, label = model_from_args(args)
    maps = attention_maps(model, tok, args.prompt, args.layer, args.head)
    out = args.out or (f"attention_L{maps.layer}" +
                       (f"_H{args.head}" if args.head is not None else "") + ".png")
    which = f"head {args.head}" if args.head is not None else "all heads"
    plot_attention(maps, out, title=f"{label}: layer {maps.layer}, {which}")
    print(top_keys_report(maps, args.top))
    print(f"wrote {out}")
    return 0
