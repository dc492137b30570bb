"""``mambatrim flops MODEL``: GFLOPs (paper and full conventions) of a model, optionally with a method."""
from __future__ import annotations

import argparse
import json

from ..analysis import CONVENTIONS, count_flops
from ..engine.build import build_model
from ..validation import check
from .models import add_method_arguments, method_from_args

EXAMPLES = """examples:
  mambatrim flops vim_tiny_patch16_224
  mambatrim flops vim_small_patch16_224 --img-size 384 --convention full
  mambatrim flops vim_tiny_patch16_224 --method rmeeto --method-opt ratio=0.31 --layers
  mambatrim flops vim_base_patch16_224 --json
conventions (multiply-accumulates per image):
  paper  one scan direction's conv/x_proj/dt_proj/scan, as the DyVM / R-MeeTo counters and published tables
  full   every scan direction that ran (both for a dense Vim)
"""


def run(args: argparse.Namespace) -> int:
    check(args.img_size, "--img-size", "positive_int")
    check(args.batch, "--batch", "positive_int")
    method, options = method_from_args(args)
    overrides = {"img_size": args.img_size} if args.img_size is not None else {}
    model = build_model(args.model, method, options, meta=method is None, **overrides)
    report = count_flops(model, batch=args.batch)
    conventions = CONVENTIONS if args.convention == "both" else (args.convention,)
    if args.json:
        out = report.to_dict()
        out.update(model=args.model, method=args.method, method_opts=args.method_opt)
        if not args.layers:
            out.pop("layers")
        print(json.dumps(out, indent=2))
        return 0
    if args.layers:
        print(report.table())
    size = "x".join(str(s) for s in report.img_size)
    label = f"{args.model}" + (f" + {args.method}" if args.method else "")
    parts = ", ".join(f"{c} {report.gflops(c):.2f}" for c in conventions)
    print(f"{label} @ {size}: GFLOPs {parts}; params {report.params / 1e6:.2f} M")
    note = "; ".join(CONVENTION_NOTES[c] for c in conventions)
    if method and _learned(method):
        note += "; " + LEARNED_NOTE.format(batch=args.batch)
    print(f"convention: multiply-accumulates per image; {note}")
    return 0


CONVENTION_NOTES = {
    "paper": "'paper' counts the scan paths as the family's papers do (Vim: one direction)",
    "full": "'full' counts every scan path that ran",
}
LEARNED_NOTE = ("the method's decisions are those its untrained predictors made on {batch} random image(s), not "
                "its target ratios (the published figures count the targets; see the README)")


def _learned(method: str) -> bool:
    from ..reduce import METHODS  # noqa: PLC0415 (imports every method)

    return method in METHODS and METHODS[method].learned


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flops", help="count GFLOPs (paper and full conventions)",
        description="Count GFLOPs of a model per image, from the tokens that actually enter each layer and the "
                    "scan directions that actually run (so reduction methods are counted exactly).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model name (see 'mambatrim models'; official long names work too)")
    parser.add_argument("--img-size", type=int, default=None, help="input side in pixels (default: the config's)")
    parser.add_argument("--convention", choices=[*CONVENTIONS, "both"], default="both",
                        help="which total(s) to print (default: both)")
    parser.add_argument("--batch", type=int, default=1,
                        help="random images to average input-dependent decisions over (default 1)")
    parser.add_argument("--layers", action="store_true", help="also print the per-layer table")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_method_arguments(parser)
    parser.set_defaults(func=run)
