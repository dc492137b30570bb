"""R-MeeTo on video: the sequence pairing (the paper's alternate sequence neighbours) vs the temporal pairing (ours:
the same location in adjacent frames) at the same r, on the video demo's trained dense VideoMamba (the bundled
moving shapes, 33 tokens a clip).

Training-free: top-1 (2 clips per video, 100 videos) for every ``--r`` with merges before blocks 1-3. Re-trained:
at ``--retrain-r``, each pairing re-trained ``--retrain-epochs`` epochs from the dense weights (distilled from
them, as the demo re-trains) once per ``--seeds``, so the gap can be read against the seed-to-seed spread.
Writes ``video_temporal_merge.{json,md}`` into ``--out``.

    mambatrim demo --task video --output-dir demo_out                        # trains the dense model
    python benchmarks/video_temporal_merge.py --dense demo_out/video_demo_run/last.pth --out benchmarks/results
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from mambatrim.analysis import count_flops
from mambatrim.engine.config import make_config
from mambatrim.engine.demo import RETRAIN_LR, build_eval_model, load_eval_data
from mambatrim.engine.evaluate import evaluate
from mambatrim.engine.report import write_result
from mambatrim.engine.train import train
from mambatrim.engine.video_demo import VIDEO_RECIPE

PAIRINGS = ("sequence", "temporal")
LAYERS = [1, 2, 3]


def options(r: int, pairing: str) -> dict[str, Any]:
    return {"r": r, "layers": LAYERS, "pairing": pairing}


def top1(data: Any, r: int | None, pairing: str, weights: str) -> tuple[float, float]:
    """(top-1 %, MFLOPs 'paper') of the demo model with ``weights``, R-MeeTo at ``r`` (None: dense)."""
    method = None if r is None else "rmeeto"
    cfg = make_config(VIDEO_RECIPE, {"method": method, "method_opts": options(r, pairing) if method else {}})
    model = build_eval_model(cfg, data, weights)
    return evaluate(model, data.val, data.device)["top1"], count_flops(model).gflops("paper") * 1e3


def retrain(dense: str, r: int, pairing: str, seed: int, epochs: int, runs: Path) -> str:
    """Re-train R-MeeTo at ``r`` from ``dense`` (distilled from it), as the demo does; returns the checkpoint."""
    run = runs / f"{pairing}_r{r}_seed{seed}"
    cfg = make_config(VIDEO_RECIPE, {
        "method": "rmeeto", "method_opts": options(r, pairing), "finetune": dense, "teacher": dense,
        "epochs": epochs, "eval_every": epochs, "lr": RETRAIN_LR, "warmup_epochs": 0, "seed": seed,
        "output_dir": str(run), "existing_output": "overwrite", "progress": False})
    train(cfg)
    return str(run / "last.pth")


def table(result: dict[str, Any]) -> str:
    dense = result["dense_top1"]
    lines = [f"R-MeeTo pairings on the video demo's dense VideoMamba (33 tokens, merges before blocks 1-3; dense "
             f"top-1 {dense:.1f} %, {result['dense_mflops']:.2f} MFLOPs). Top-1 % over 100 videos x 2 clips.", "",
             "Training-free:", "", "| r | MFLOPs (sequence / temporal) | sequence | temporal | temporal - sequence |",
             "|---|---|---|---|---|"]
    for row in result["training_free"]:
        s, t = row["sequence"], row["temporal"]
        lines.append(f"| {row['r']} | {row['mflops']['sequence']:.2f} / {row['mflops']['temporal']:.2f} | "
                     f"{s:.1f} | {t:.1f} | {t - s:+.1f} |")
    rt = result["retrained"]
    lines += ["", f"Re-trained {rt['epochs']} epochs at r = {rt['r']}, seeds {rt['seeds']}:", "",
              "| pairing | top-1 per seed | mean | vs dense |", "|---|---|---|---|"]
    for pairing in PAIRINGS:
        accs = rt[pairing]
        mean = statistics.mean(accs)
        lines.append(f"| {pairing} | {', '.join(f'{a:.1f}' for a in accs)} | {mean:.1f} | {mean - dense:+.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True, help="the video demo's dense checkpoint (video_demo_run/last.pth)")
    parser.add_argument("--out", required=True, help="folder for the results")
    parser.add_argument("--runs", default="runs/video_temporal_merge", help="folder for the re-training runs")
    parser.add_argument("--r", type=int, nargs="+", default=[2, 4, 6, 8, 10], help="training-free r values")
    parser.add_argument("--retrain-r", type=int, default=6, help="r of the re-trained rows (the demo's)")
    parser.add_argument("--retrain-epochs", type=int, default=2, help="re-training epochs (the demo's 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="re-training seeds")
    args = parser.parse_args()
    start, out = time.time(), Path(args.out)
    data = load_eval_data(make_config(VIDEO_RECIPE))
    dense_top1, dense_mflops = top1(data, None, "sequence", args.dense)
    free = []
    for r in args.r:
        runs = {p: top1(data, r, p, args.dense) for p in PAIRINGS}
        free.append({"r": r, **{p: runs[p][0] for p in PAIRINGS}, "mflops": {p: runs[p][1] for p in PAIRINGS}})
        print(f"r={r}: " + ", ".join(f"{p} {runs[p][0]:.1f}%" for p in PAIRINGS))
    retrained: dict[str, Any] = {"r": args.retrain_r, "epochs": args.retrain_epochs, "seeds": args.seeds}
    for pairing in PAIRINGS:
        retrained[pairing] = [top1(data, args.retrain_r, pairing,
                                   retrain(args.dense, args.retrain_r, pairing, seed, args.retrain_epochs,
                                                   Path(args.runs)))[0]
                              for seed in args.seeds]
        print(f"re-trained {pairing}: {retrained[pairing]}")
    result = {"dense_checkpoint": args.dense, "dense_top1": dense_top1, "dense_mflops": dense_mflops,
              "layers": LAYERS, "training_free": free, "retrained": retrained, "wall_seconds": time.time() - start}
    write_result(out, "video_temporal_merge", result, table(result))
    print(table(result))


if __name__ == "__main__":
    main()
