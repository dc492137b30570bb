"""The ``mambatrim`` command: one sub-command per module under ``mambatrim.commands``."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``register(subparsers)``, adding its parser and setting ``func(args) -> int``.
COMMAND_MODULES = ["models", "flops", "bench", "compare", "info", "train", "eval", "demo"]


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"mambatrim {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
