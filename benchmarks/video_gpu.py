"""The GPU-sized video run on the bundled moving shapes: a VideoMamba with VideoMamba-Ti's width (192), 12 blocks
and 8 frames of 8 x 8 patches (513 tokens a clip) trained from scratch in bf16, then dense vs R-MeeTo 0.31
(training-free and re-trained; sequence and temporal pairing) vs DyVM (keep 0.7, block ratio 0.8, fine-tuned):
top-1 over 2 clips per video, FLOPs (both conventions in the JSON) and clips/s, all timed in one process by the
comparison harness (bf16, CUDA graphs, interleaved rounds). The demo's machinery with
:data:`mambatrim.engine.video_demo.VIDEO_GPU_DEMO`; writes ``video_gpu_results.{json,md}`` and
``video_gpu_tradeoff.png`` (and the runs) into ``--out``.

    python benchmarks/video_gpu.py --out runs/video_gpu                       # one GPU, a few minutes
    python benchmarks/video_gpu.py --out runs/check --device cpu --epochs 1 --retrain-epochs 1 --depth 6 \\
        --embed-dim 32 --patch-size 16 --rounds 1                    # a CPU check that it runs (33 tokens)
"""
from __future__ import annotations

import argparse
import dataclasses

from mambatrim.engine.demo import run_demo
from mambatrim.engine.video_demo import VIDEO_GPU_DEMO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the results and the runs")
    parser.add_argument("--device", default="cuda", help="cuda (default) | cpu | auto")
    parser.add_argument("--epochs", type=int, default=None, help="dense training epochs (default: the recipe's)")
    parser.add_argument("--retrain-epochs", type=int, default=5, help="re-training epochs per method (default 5)")
    parser.add_argument("--depth", type=int, default=None,
                        help="blocks (default: the recipe's 12; >= 6 for R-MeeTo's ratio 0.31)")
    parser.add_argument("--embed-dim", type=int, default=None, help="width (default: the recipe's 192)")
    parser.add_argument("--patch-size", type=int, default=None, help="patch side in px (default: the recipe's 4)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    parser.add_argument("--reuse-runs", action="store_true", help="measure finished runs in --out again")
    args = parser.parse_args()
    task = VIDEO_GPU_DEMO
    given = (("depth", args.depth), ("embed_dim", args.embed_dim), ("patch_size", args.patch_size))
    sizes = {k: v for k, v in given if v is not None}
    if sizes:
        recipe = dict(task.recipe, model_kwargs={**task.recipe["model_kwargs"], **sizes})
        task = dataclasses.replace(task, recipe=recipe)
    result = run_demo(args.out, args.device, args.epochs, threads=None, retrain_epochs=args.retrain_epochs,
                      task=task, rounds=args.rounds, progress=False, reuse_runs=args.reuse_runs)
    print(f"\n{result['model']}\n\n{result['table']}\n\n{result['verdict']}")
    print(f"\nwhole run: {result['wall_seconds']:.0f}s (dense training {result['train_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
