"""``mambatrim search MODEL --method NAME --target speedup=1.3``: pick a setting of one reduction method for a
budget. Candidate settings are timed against dense on this device in one process (interleaved rounds, CUDA
graphs on a GPU); prints the Pareto front and the chosen setting as a ``--method-opt`` line and YAML.

Targets: speedup=X, img_per_s=X, gflops=X (paper convention) or max_drop=X (points of top-1; needs --checkpoint
and data). Settings slower than dense here are flagged and never chosen. Time: about candidates x rounds x iters
forwards plus one graph capture per candidate (Vim-S on one GPU: well under a minute per method family).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

EXAMPLES = """examples:
  mambatrim search vim_small_patch16_224 --method rmeeto --target speedup=1.3
  mambatrim search vim_small_patch16_224 --method dyvm --target speedup=1.3 --out benchmarks/results
  mambatrim search vim_tiny_patch16_224 --method top --target gflops=1.1 --candidates "[{keep: 0.8}, {keep: 0.6}]"
  mambatrim search --checkpoint demo_run/last.pth --method rmeeto --target max_drop=1 --device cpu
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("search", help="pick a method setting for a speed, FLOPs or accuracy budget",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="model name (default: the checkpoint's)")
    parser.add_argument("--method", required=True, help="method family to search (e.g. rmeeto, dyvm, top)")
    parser.add_argument("--target", required=True, help="speedup=X | img_per_s=X | gflops=X | max_drop=X")
    parser.add_argument("--candidates", default=None, metavar="YAML",
                        help="candidate option sets as a YAML list of mappings (default: the family's grid)")
    parser.add_argument("--checkpoint", default=None, help="a mambatrim checkpoint: its model, and top-1 of every "
                                                           "candidate on its data (or --data-path)")
    parser.add_argument("--data-path", default=None, help="evaluation data for top-1 (a folder, zip or digits)")
    parser.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="model override (repeatable, e.g. depth=4)")
    parser.add_argument("--img-size", type=int, default=None, help="input side (default 224, or the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward (default 128 GPU, 8 CPU)")
    parser.add_argument("--dtype", default="bf16", help="autocast precision (default bf16)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--iters", type=int, default=10, help="forwards per candidate and round (default 10)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forwards per candidate (default 5)")
    parser.add_argument("--out", default=None, metavar="DIR", help="write STEM.json and STEM.md into DIR")
    parser.add_argument("--stem", default=None, help="result file stem (default search_METHOD)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._yaml import load_yaml_text
    from ..engine.benchmark import resolve_device
    from ..engine.report import write_result
    from ..engine.search import search, to_markdown
    from ..reduce import parse_method_options
    from ..validation import check

    for value, name in ((args.batch_size, "--batch-size"), (args.img_size, "--img-size"),
                        (args.rounds, "--rounds"), (args.iters, "--iters")):
        check(value, name, "positive_int")
    candidates = load_yaml_text(args.candidates) if args.candidates else None
    if candidates is not None and (not isinstance(candidates, list) or
                                   not all(isinstance(c, dict) for c in candidates)):
        raise ValueError(f"--candidates must be a YAML list of option mappings, e.g. \"[{{keep: 0.8}}]\"; "
                         f"got {args.candidates!r}")
    model, kwargs, img_size, accuracy = _model_and_accuracy(args, parse_method_options(args.model_opt))
    device = resolve_device(args.device)
    batch = args.batch_size or (128 if device.type == "cuda" else 8)
    result = search(model, args.method, args.target, candidates, accuracy=accuracy,
                    log=lambda text: print(text, file=sys.stderr, flush=True), img_size=img_size,
                    batch_size=batch, dtype=args.dtype, device=device, rounds=args.rounds, iters=args.iters,
                    warmup=args.warmup, model_kwargs=kwargs)
    markdown = to_markdown(result)
    print(markdown)
    if args.out:
        write_result(args.out, args.stem or f"search_{args.method}", result, markdown)
    return 0


def _model_and_accuracy(args: argparse.Namespace, model_opts: dict[str, Any]) -> tuple[str, dict, int, Any]:
    """The model to time (name, overrides, input side) and, with a checkpoint, top-1 of a setting on its data."""
    if args.checkpoint is None:
        if args.model is None:
            raise ValueError("give MODEL or --checkpoint")
        if args.data_path:
            raise ValueError("--data-path needs --checkpoint (top-1 of random weights means nothing)")
        return args.model, model_opts, args.img_size or 224, None
    from ..engine.config import make_config
    from ..engine.evaluate import config_from_checkpoint, evaluate_checkpoint
    from ..models.checkpoint import read_checkpoint

    base = config_from_checkpoint(read_checkpoint(args.checkpoint))
    base.update({k: v for k, v in (("model", args.model), ("data_path", args.data_path)) if v})
    base["model_kwargs"] = {**base.get("model_kwargs", {}), **model_opts}
    base.update(device=args.device, progress=False, method=None, method_opts={})
    kwargs = {**base["model_kwargs"], "in_chans": base.get("in_chans", 3), "num_classes": base.get("num_classes", 1000)}
    img_size = args.img_size or base.get("input_size") or 224

    def accuracy(method: str | None, options: dict[str, Any]) -> float:
        cfg = make_config(base, {"method": method, "method_opts": options})
        return evaluate_checkpoint(cfg, args.checkpoint, throughput=False)["top1"]

    return base["model"], kwargs, img_size, accuracy
