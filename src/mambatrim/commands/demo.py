"""``mambatrim demo``: the first command to run. Trains a small Vision Mamba on scikit-learn's bundled
handwritten digits (no download, CPU, a few minutes), evaluates it, applies every registered reduction method
and prints accuracy / FLOPs / measured img/s, with a trade-off plot (PNG)."""
from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="train a small Vim on bundled digits and compare every method",
                                   description=__doc__)
    parser.add_argument("--output-dir", "--output_dir", default=".",
                        help="where the plot, results JSON and the demo runs go (default: current folder); a "
                             "previous demo's runs there are replaced")
    parser.add_argument("--task", choices=["image", "video"], default="image",
                        help="image (default): Vim on the bundled digits; video: VideoMamba on the bundled moving "
                             "shapes (needs PyAV), dense vs R-MeeTo vs DyVM")
    parser.add_argument("--device", default="cpu", help="cpu (default) | cuda | auto")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 12; video 15)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: fastest for this tiny model on a shared machine)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.demo import run_demo
    from ..validation import check

    check(args.epochs, "--epochs", "positive_int")
    check(args.threads, "--threads", "positive_int")
    if args.task == "video":
        return run_video(args)
    result = run_demo(args.output_dir, args.device, args.epochs, args.threads, progress=args.progress)
    print()
    print(result["table"])
    dense = result["rows"][0]
    print(f"\ndense model trained in {result['train_seconds']:.0f}s; top-1 {dense['top1']:.2f}% on the 360 "
          f"held-out digits")
    print(f"trade-off plot: {result['plot']}")
    print(f"results: {result['plot'].rsplit('/', 1)[0] if '/' in result['plot'] else '.'}/demo_results.json")
    return 0


def run_video(args: argparse.Namespace) -> int:
    from ..engine.video_demo import run_video_demo

    result = run_video_demo(args.output_dir, args.device, args.epochs, args.threads, progress=args.progress)
    print()
    print(result["table"])
    print(f"\ndense model trained in {result['train_seconds']:.0f}s; top-1 over 2 clips per video of the 100 "
          f"held-out moving-shapes videos (one frame alone: at most 50%)")
    print(f"trade-off plot: {result['plot']}")
    return 0
