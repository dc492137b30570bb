"""``mambatrim bench MODEL``: throughput (images/s) on the available device, JSON to stdout."""
from __future__ import annotations

import argparse
import json
import os

import torch

from ..engine.benchmark import DTYPES, measure_throughput, resolve_device
from ..engine.report import write_json
from ..engine.build import build_model
from ..ops import BACKENDS, use_backend
from ..validation import check_all
from .models import add_method_arguments, method_from_args

EXAMPLES = """examples:
  mambatrim bench vim_tiny_patch16_224                          # CPU or GPU, whichever is here
  mambatrim bench vim_tiny_patch16_224 --device cpu --batch-size 8 --iters 30
  mambatrim bench vim_small_patch16_224 --dtype bf16 --batch-size 128
  mambatrim bench vim_small_patch16_224 --dtype bf16 --batch-size 128 --cuda-graph
  mambatrim bench vim_tiny_patch16_224 --train --batch-size 32 --json-out runs/bench.json
  mambatrim bench vim_tiny_patch16_224 --method rmeeto --method-opt ratio=0.31
timing: median of --iters timed iterations after --warmup untimed ones (CUDA events on a GPU).
"""


def check_arguments(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse zero, negative and impossible values before any work (never silently replaced by a default)."""
    check_all(vars(args), {"batch_size": "positive_int", "img_size": "positive_int", "iters": "positive_int",
                           "warmup": "non_negative_int"}, option_name=lambda key: "--" + key.replace("_", "-"))
    if args.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 for slow CPU testing)")


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    check_arguments(args, device)
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    method, options = method_from_args(args)
    model = build_model(args.model, method, options, img_size=args.img_size)
    with use_backend(args.backend):
        result = measure_throughput(model, batch_size=batch, img_size=args.img_size, device=device,
                                    cuda_graph=args.cuda_graph,
                                    dtype=args.dtype, warmup=args.warmup, iters=args.iters, train=args.train)
    result = {"model": args.model, "method": args.method, "method_opts": args.method_opt,
              "params": sum(p.numel() for p in model.parameters()), **result}
    print(json.dumps(result, indent=2))
    if args.json_out:
        write_json(args.json_out, result)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure throughput (images/s), JSON output",
        description="Measure a model's throughput on random images: inference by default, or a full training "
                    "step (forward, backward, AdamW) with --train.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model name (see 'mambatrim models')")
    parser.add_argument("--batch-size", type=int, default=None, help="images per iteration (default 64 GPU, 8 CPU)")
    parser.add_argument("--img-size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast precision (default fp32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--iters", type=int, default=30, help="timed iterations (default 30)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up iterations (default 10)")
    parser.add_argument("--train", action="store_true", help="time training steps instead of inference")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="inference replayed from a captured CUDA graph (removes Python launch overhead)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="scan backend (default: triton on CUDA when available, else torch)")
    parser.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON result to FILE")
    add_method_arguments(parser)
    parser.set_defaults(func=run)
