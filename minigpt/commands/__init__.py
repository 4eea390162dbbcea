"""One module per ``minigpt`` subcommand. Each defines

    NAME = "train"                      # the subcommand
    HELP = "one line for minigpt --help"
    def add_arguments(parser): ...      # argparse options
    def run(args) -> int | None: ...    # the work

and is picked up by minigpt/cli.py automatically."""
