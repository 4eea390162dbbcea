"""The ``minigpt`` command: subcommands come from the modules in minigpt/commands/."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import minigpt.commands


def _commands():
    mods = []
    for info in sorted(pkgutil.iter_modules(minigpt.commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mods.append(importlib.import_module(f"minigpt.commands.{info.name}"))
    return mods


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless that would mislead: argparse's own formatter appends
    "(default: None)" to options whose help already says what None means, and "(default: True)"
    to a --no-x switch that is off unless given."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not text or "default" in text or action.required or action.nargs == 0
                or action.default is None or action.default is argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minigpt", description="MiniGPT: train, sample and inspect small GPTs on fused kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP,
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        rc = args._run(args)
    except BrokenPipeError:
        # The reader left early (`| head`): nothing to report. stdout goes to devnull so that
        # Python's flush at exit does not fail on the closed pipe again (Python's docs' recipe).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor
            pass
        return 1
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        # Bad input and file-system trouble (a missing file, a path that is a file where a
        # folder is wanted, no permission) get one clear line, not a traceback.
        print(f"minigpt {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
