"""``mambatrim demo``: the first command to run. Trains a small Vision Mamba on the bundled handwritten digits
(no download, CPU, a few minutes), applies the reduction methods training-free and briefly re-trained, and
prints accuracy, FLOPs and speed relative to dense (median of interleaved timing rounds, with the spread), with
a trade-off plot (PNG)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

NEXT_STEPS = """next:
  mambatrim visualize --checkpoint {out}/{stem}_run/last.pth --method rmeeto --out {out}/visualize
      (which tokens each method keeps or merges, as PNG grids)
  mambatrim compare vim_small_patch16_224 --method rmeeto --method-opt ratio=0.31   (on a GPU: real speed-ups)
  mambatrim search vim_small_patch16_224 --method rmeeto --target speedup=1.3   (pick a setting for a budget)
  mambatrim train --config configs/rmeeto_cifar10.yaml --data-path CIFAR10.zip   (the CIFAR-10 protocol)"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="train a small Vim on bundled digits and compare the methods",
                                   description=__doc__)
    parser.add_argument("--output-dir", "--output_dir", default=".",
                        help="where the plot, results JSON and the demo runs go (default: current folder); a "
                             "previous demo's runs there are replaced")
    parser.add_argument("--task", choices=["image", "video"], default="image",
                        help="image (default): Vim on the bundled digits; video: VideoMamba on the bundled moving "
                             "shapes (needs PyAV), dense vs R-MeeTo vs DyVM (33 tokens a clip on the CPU, 513 on a "
                             "GPU)")
    parser.add_argument("--device", default="cpu", help="cpu (default) | cuda | auto")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs of the dense model (default 6; video 15)")
    parser.add_argument("--retrain-epochs", type=int, default=2,
                        help="re-training epochs per method and for the dense control row (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a busy machine two threads of small ops wait on each other "
                             "and run many times slower)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="measure the finished runs already in --output-dir again instead of re-training them")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.demo import IMAGE_DEMO, run_demo
    from ..validation import check

    for value, name in ((args.epochs, "--epochs"), (args.retrain_epochs, "--retrain-epochs"),
                        (args.threads, "--threads"), (args.rounds, "--rounds")):
        check(value, name, "positive_int")
    task = IMAGE_DEMO
    if args.task == "video":
        from ..engine.video_demo import VIDEO_DEMO, VIDEO_GPU_DEMO

        from ..engine.benchmark import resolve_device

        gpu = resolve_device(args.device).type == "cuda"
        task = VIDEO_GPU_DEMO if gpu else VIDEO_DEMO  # a GPU gets the 513-token run
    result = run_demo(args.output_dir, args.device, args.epochs, args.threads, retrain_epochs=args.retrain_epochs,
                      task=task, rounds=args.rounds, progress=args.progress, reuse_runs=args.reuse_runs)
    out, stem = Path(args.output_dir), task.stem
    print(f"\n{result['model']}\n\n{result['table']}\n\n{result['verdict']}")
    print(f"\nwhole demo: {result['wall_seconds']:.0f}s (dense training {result['train_seconds']:.0f}s)")
    print(f"files: {out / (stem + '_results.md')}, {out / (stem + '_results.json')}, {result['plot']}, runs in "
          f"{out / (stem + '_run*')}")
    print(NEXT_STEPS.format(out=out, stem=stem))
    return 0
