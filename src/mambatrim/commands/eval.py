"""``mambatrim eval``: accuracy (top-1/top-5), FLOPs and measured throughput of a checkpoint, with any
reduction method attached (``--method NAME --method-opt key=value``).

A checkpoint written by ``mambatrim train`` carries its model and data settings; official checkpoints need
``--model`` (and ``--data-path``).
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..validation import check

from .train import EVAL_KEYS, add_config_arguments, config_from_args

EXAMPLES = """examples:
  mambatrim eval --checkpoint runs/digits/best.pth
  mambatrim eval --checkpoint runs/digits/best.pth --method NAME --method-opt ratio=0.3
  mambatrim eval --model vim_tiny_patch16_224 --checkpoint vim_t_midclstok_76p1acc.pth --data-path imagenet/
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help="accuracy + FLOPs + throughput of a checkpoint",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", "--ckpt", help="weights to evaluate (default: a fresh model)")
    parser.add_argument("--use-ema", action="store_true", help="evaluate the checkpoint's model_ema weights")
    parser.add_argument("--no-throughput", dest="throughput", action="store_false",
                        help="skip the throughput measurement (accuracy and FLOPs only)")
    parser.add_argument("--bench-batch", type=int, default=64,
                        help="images per iteration of the throughput measurement (default 64)")
    parser.add_argument("--json", dest="json_out", help="also write the result to this JSON file")
    add_config_arguments(parser, EVAL_KEYS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.evaluate import config_from_checkpoint, evaluate_checkpoint
    from ..engine.report import write_json
    from ..models.checkpoint import read_checkpoint

    if args.task == "segmentation":
        from .segment import run_eval

        return run_eval(args)
    check(args.bench_batch, "--bench-batch", "positive_int")
    base = config_from_checkpoint(read_checkpoint(args.checkpoint)) if args.checkpoint else {}
    cfg = config_from_args(args, base)
    result = evaluate_checkpoint(cfg, args.checkpoint, use_ema=args.use_ema, throughput=args.throughput,
                                 bench_batch=args.bench_batch)
    shown = {k: v for k, v in result.items() if k != "bench"}
    print(json.dumps(shown, indent=2, default=str))
    if args.json_out:
        write_json(args.json_out, result)
    return 0
