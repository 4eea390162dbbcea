"""minigpt chat: talk to an instruct model in the terminal, replies streaming as they come.

Each line you type is a user turn; the whole conversation goes through the model's chat
template (SmolLM2's ChatML) every turn. ``/exit`` (or end of input) ends, ``/reset`` forgets
the conversation. Reads stdin, so it can be scripted: ``printf 'hi\\n/exit\\n' | minigpt chat``.
"""
from __future__ import annotations

import sys

from minigpt.commands.generate import Stats, add_model_arguments, load_for_args, stream_text

NAME = "chat"
HELP = "interactive chat with an instruct model (SmolLM2 by default), streaming replies"


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("--system", default=None,
                   help="system message (default: the chat template's own, if it has one)")


class MessageTooLong(ValueError):
    """The newest message alone does not fit the context: the chat drops it and goes on."""


def _fit(tokenizer, messages, context, reserve):
    """Render the conversation; drop the oldest turns (never the system message) until the
    prompt leaves ``reserve`` tokens of room for the reply."""
    msgs = list(messages)
    while True:
        ids = tokenizer.encode_chat(msgs, add_generation_prompt=True)
        if len(ids) + reserve <= context:
            return ids, msgs
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            if first:
                alone = len(tokenizer.encode_chat(msgs[:1], add_generation_prompt=True))
                if alone + reserve > context:  # no message could fit: not this message's fault
                    raise ValueError(f"the system message is {alone} tokens long; with room for "
                                     f"a reply of {reserve} tokens it leaves no room in the "
                                     f"model's context of {context}")
            raise MessageTooLong(f"the message is {len(ids)} tokens long; with room for a reply "
                                 f"of {reserve} tokens it does not fit the model's context of "
                                 f"{context}")
        del msgs[first:first + 2]   # the oldest user turn and its reply


def run(args) -> int:
    model, tokenizer = load_for_args(args)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{args.model} has no chat template; use `minigpt generate` instead")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    context = model.config.block_size
    reserve = min(args.max_new_tokens, context // 2)
    if interactive:
        print("(type /exit to quit, /reset to start over)", file=sys.stderr)
    stats = Stats() if args.stats else None
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:                      # end of input
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(system)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        try:
            ids, messages = _fit(tokenizer, messages, context, reserve)
        except MessageTooLong as e:  # this message alone is too long: the conversation goes on
            messages.pop()
            print(f"minigpt chat: {e}; message dropped", file=sys.stderr)
            continue
        reply = stream_text(model, tokenizer, ids, args, stats=stats)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})
    if stats is not None:
        print(stats.line(), file=sys.stderr)
    return 0
