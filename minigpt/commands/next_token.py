"""`minigpt next-token`: "predict the next token, one step at a time", made visible: at each
step the most likely next tokens with their probabilities, and the one picked."""

NAME = "next-token"
HELP = "generate step by step, showing the top candidate tokens and their probabilities"


def add_arguments(p):
    from minigpt.inspect import add_source_arguments

    add_source_arguments(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--steps", type=int, default=5, help="tokens to generate")
    p.add_argument("--top", type=int, default=5, help="candidates to show per step")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = always pick the most likely; > 0 samples from softmax(logits / T)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling threshold in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (with --temperature > 0)")


def run(args):
    from minigpt.inspect import model_from_args, next_token_steps, steps_report

    if not args.prompt:
        raise ValueError("--prompt is empty: give at least one character")
    model, tok, _ = model_from_args(args)
    steps = next_token_steps(model, tok, args.prompt, args.steps, args.top, args.temperature,
                             args.top_p, args.seed)
    print(steps_report(steps))
    return 0
