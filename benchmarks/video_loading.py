"""Video loading speed: clips/s of the training loader (PyAV decoding, TSN sampling, clip-consistent
RandomResizedCrop) for several DataLoader worker counts, and of the multi-view evaluation loader.

Each setting runs one pass over up to ``--max-clips`` clips after a warm-up batch (worker start-up is timed
separately); clips/s = clips delivered / wall time of the pass. Decoding happens in the workers, so on a
shared CPU the figure scales with the free cores. Writes ``video_loading.json`` and ``video_loading.md``.

    python benchmarks/video_loading.py --out benchmarks/results                     # the bundled moving shapes
    python benchmarks/video_loading.py --data-path k400/ --size 224 --workers 0 4 8 16 --out results
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from mambatrim.data import DataOptions, build_data
from mambatrim.engine.benchmark import run_environment
from mambatrim.engine.report import write_result


def one_pass(loader, max_clips: int) -> dict:
    """Time one pass (the first batch, which starts the workers, timed on its own)."""
    loader.set_epoch(0)
    start = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    first_s = time.perf_counter() - start
    clips, start = 0, time.perf_counter()
    for x, _ in batches:
        clips += x.shape[0]
        if clips >= max_clips:
            break
    wall = time.perf_counter() - start
    return {"clips": clips, "wall_s": wall, "clips_per_s": clips / max(wall, 1e-9), "first_batch_s": first_s,
            "clip_shape": list(first[0].shape[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", default="moving-shapes")
    parser.add_argument("--size", type=int, default=None, help="crop side (default: the data's native size)")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-clips", type=int, default=2)
    parser.add_argument("--test-crops", type=int, default=3)
    parser.add_argument("--max-clips", type=int, default=192)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default="video_loading")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for workers in args.workers:
        opts = DataOptions(data_path=args.data_path, task="video", input_size=args.size, num_frames=args.num_frames,
                           batch_size=args.batch_size, num_workers=workers, test_clips=args.test_clips,
                           test_crops=args.test_crops, video_flip=False)
        bundle = build_data(opts, torch.device("cpu"))
        for split, loader in (("train", bundle.train), ("eval", bundle.val)):
            res = one_pass(loader, args.max_clips)
            res.update(split=split, workers=workers, views=1 if split == "train" else args.test_clips * args.test_crops)
            rows.append(res)
            print(f"{split:5s} workers={workers}: {res['clips_per_s']:.1f} clips/s ({res['clips']} clips, "
                  f"{res['views']} view(s) each, first batch {res['first_batch_s']:.2f}s)", flush=True)
    result = {"data_path": args.data_path, "size": args.size, "num_frames": args.num_frames,
              "batch_size": args.batch_size, "rows": rows, "cpu_count": os.cpu_count(),
              "processor": platform.processor(), "environment": run_environment(torch.device("cpu"))}
    lines = [f"# Video loading: clips/s ({args.data_path}, {args.num_frames} frames, batch {args.batch_size}, "
             f"CPU, {os.cpu_count()} cores shared)", "",
             "| split | workers | views per clip | clip shape (C, T, H, W) | clips | clips/s | first batch (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['split']} | {r['workers']} | {r['views']} | {tuple(r['clip_shape'])} | {r['clips']} | "
                     f"{r['clips_per_s']:.1f} | {r['first_batch_s']:.2f} |")
    write_result(args.out, args.stem, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
