"""``mambatrim models``: the registered configs of every backbone family with parameters and FLOPs.

Also home of the ``--method`` / ``--method-opt`` arguments the other commands share.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..engine.build import build_model
from ..models import OFFICIAL_ALIASES, list_models

EXAMPLES = """examples:
  mambatrim models
  mambatrim models --aliases        # also list the official hustvl/Vim registration names
  mambatrim models --json
"""


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """``--method NAME --method-opt key=value ...`` (reduction methods from ``mambatrim.reduce``)."""
    parser.add_argument("--method", default=None,
                        help="reduction method to attach (see 'mambatrim info' for the registered ones)")
    parser.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="method option, repeatable (e.g. --method-opt ratio=0.31 --method-opt layers=[6,12])")


def method_from_args(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """(method name, parsed ``--method-opt`` values); options without a method are refused."""
    if args.method_opt and not args.method:
        raise ValueError("--method-opt given without --method")
    from ..reduce import parse_method_options  # noqa: PLC0415 (imports every method)

    return args.method, parse_method_options(args.method_opt)


def model_rows(include_aliases: bool = False) -> list[dict[str, Any]]:
    from ..analysis import count_flops  # noqa: PLC0415

    rows = []
    for name in list_models():
        report = count_flops(build_model(name, meta=True))
        rows.append({"name": name, "params_m": report.params / 1e6, "gflops_paper": report.gflops("paper"),
                     "gflops_full": report.gflops("full")})
        if include_aliases:
            rows[-1]["aliases"] = [alias for alias, target in OFFICIAL_ALIASES.items() if target == name]
    return rows


def run(args: argparse.Namespace) -> int:
    rows = model_rows(args.aliases)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<32} {'params (M)':>10} {'GFLOPs paper':>12} {'GFLOPs full':>11}")
    for row in rows:
        print(f"{row['name']:<32} {row['params_m']:>10.2f} {row['gflops_paper']:>12.2f} {row['gflops_full']:>11.2f}")
        for alias in row.get("aliases", []):
            print(f"  alias: {alias}")
    print("GFLOPs: multiply-accumulates per input at the config's size; 'paper' counts the scan paths as the "
          "family's papers do (Vim: one direction), 'full' every path.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list the Vision Mamba configs with parameters and FLOPs",
        description="List the registered Vision Mamba configs (usable with timm.create_model after "
                    "'import mambatrim') with parameter counts and GFLOPs at 224x224.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aliases", action="store_true", help="also show the official long registration names")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
