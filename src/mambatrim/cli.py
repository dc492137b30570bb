"""The ``mambatrim`` command: one sub-command per module under ``mambatrim.commands``."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from .models.checkpoint import CheckpointMismatchError

# Each module defines ``register(subparsers)``, adding its parser and setting ``func(args) -> int``.
COMMAND_MODULES = ["models", "flops", "bench", "compare", "info", "train", "eval", "demo", "data"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambatrim",
        description="Fast Vision Mamba: token pruning, merging and dynamic SSM-block selection.",
        epilog="Run 'mambatrim COMMAND --help' for a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"mambatrim.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"mambatrim.commands.{name}":
                raise
            continue  # not built yet
        module.register(sub)
    return parser


# What a user can cause (a bad value, a missing or corrupt file, no GPU, a diverging run): one line on stderr and
# exit code 2, as argparse does for a bad option; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError, FloatingPointError)
USAGE_ERROR = 2
SIGINT_EXIT = 128 + signal.SIGINT


def error_line(err: BaseException) -> str:
    """The message of ``err`` on one line; a checkpoint mismatch keeps its list of keys, one per line."""
    if isinstance(err, CheckpointMismatchError):
        return str(err)
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return USAGE_ERROR
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"mambatrim {args.command}: error: {error_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"mambatrim {args.command}: interrupted", file=sys.stderr)
        return SIGINT_EXIT


if __name__ == "__main__":
    sys.exit(main())
