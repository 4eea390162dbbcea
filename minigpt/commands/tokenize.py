"""`minigpt tokenize`: the tokens a model sees for a text: ids, vocabulary entries and the text
each one stands for; character-level and BPE side by side."""

NAME = "tokenize"
HELP = "show the tokens (ids and pieces) of a text; character-level vs BPE side by side"


def add_arguments(p):
    from minigpt.inspect import add_source_arguments

    add_source_arguments(p, device=False, both=True)
    p.add_argument("text", help="the text to tokenize")
    p.add_argument("--compare", action="store_true",
                   help="also show the other kind of tokenizer for the same text (with only a BPE "
                        "model: characters of the text itself; with only a checkpoint: SmolLM2's "
                        "BPE). On by default when both --checkpoint and --model are given")


def run(args):
    from minigpt.inspect import _is_char, load_tokenizer, tokenize_report
    from minigpt.tokenizer import CharTokenizer

    if args.checkpoint is None and args.model is None:
        raise ValueError("give --checkpoint DIR and/or --model NAME (e.g. smollm2)")
    toks = []
    if args.checkpoint is not None:
        toks.append(load_tokenizer(checkpoint=args.checkpoint))
    if args.model is not None:
        toks.append(load_tokenizer(model=args.model))
    if args.compare and len(toks) == 1:
        if _is_char(toks[0]):
            toks.append(load_tokenizer(model="smollm2"))
        else:  # a character vocabulary of the text itself: one token per character
            toks.append(CharTokenizer.from_text(args.text) if args.text else None)
    char = next((t for t in toks if t is not None and _is_char(t)), None)
    bpe = next((t for t in toks if t is not None and not _is_char(t)), None)
    if len(toks) == 2 and (char is None or bpe is None):
        # two of a kind (e.g. two checkpoints' character vocabularies): show both, one by one
        from minigpt.inspect import token_table
        print("\n\n".join(token_table(t, args.text, f"tokenizer {n + 1}")
                          for n, t in enumerate(toks)))
        return 0
    print(tokenize_report(args.text, char, bpe))
    return 0
