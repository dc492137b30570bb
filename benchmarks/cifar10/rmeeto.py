"""R-MeeTo CIFAR-10 protocol: training-free sweep over ratios, then re-training at the ratio closest to 0.31.

Starts from a dense CIFAR-10 baseline checkpoint written by ``mambatrim train`` (it records its model and data
settings). Every number comes from the project's engine: ``evaluate_checkpoint`` for accuracy and FLOPs,
``train`` for re-training (R-MeeTo recipe of ``configs/rmeeto_cifar10.yaml``: CE + 0.5 KL to the frozen dense
baseline as teacher, AdamW, cosine, no warm-up), layered over the baseline's own data/augmentation settings.

    python benchmarks/cifar10/rmeeto.py --data-path cifar10.zip --checkpoint benchmarks/cifar10/BASELINE.pth \
        --out benchmarks/results --epochs 3

Writes ``rmeeto_cifar10.json`` and ``rmeeto_cifar10.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from mambatrim.engine.baseline import baseline_settings, baseline_shape
from mambatrim.engine.config import load_yaml, make_config
from mambatrim.engine.evaluate import evaluate_checkpoint
from mambatrim.engine.report import write_result
from mambatrim.engine.train import train
from mambatrim.models.checkpoint import read_checkpoint
from mambatrim.reduce import rmeeto

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "rmeeto_cifar10.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="the CIFAR-10 zip (train/ and test/ class folders)")
    parser.add_argument("--checkpoint", required=True, help="dense baseline checkpoint (mambatrim train output)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.14, 0.28, 0.31, 0.42, 0.54])
    parser.add_argument("--retrain-ratio", type=float, default=0.31, help="re-train at the r closest to this")
    parser.add_argument("--epochs", type=int, default=3, help="re-training epochs (0: training-free only)")
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a re-training config key (YAML value)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="rmeeto_cifar10", help="output file stem")
    args = parser.parse_args()

    from mambatrim.reduce import parse_method_options

    base = baseline_settings(read_checkpoint(args.checkpoint))
    common = {**base, "data_path": args.data_path, "device": args.device, "progress": False}
    dense = evaluate_checkpoint(make_config(common), args.checkpoint, throughput=False)
    tokens, depth, protected = baseline_shape(base)
    print(f"dense: top-1 {dense['top1']:.2f}%  {dense['gflops']:.4f} GFLOPs  ({tokens} tokens)", flush=True)

    top = rmeeto.ratio_for_r((tokens - protected) // 2, tokens, depth, protected=protected)
    sweep = []
    for ratio in args.ratios:
        if ratio > top + 0.005:
            print(f"ratio {ratio:.2f} skipped: this model ({tokens} tokens, depth {depth}) reaches at most "
                  f"{top:.3f}", flush=True)
            continue
        r = rmeeto.r_for_ratio(ratio, tokens, depth, protected=protected)
        cfg = make_config(common, {"method": "rmeeto", "method_opts": {"r": r}})
        res = evaluate_checkpoint(cfg, args.checkpoint, throughput=False)
        sweep.append(row(ratio, r, res, dense, tokens, depth, protected))
        print(f"training-free ratio {ratio:.2f} (r={r}): top-1 {res['top1']:.2f}% "
              f"(drop {dense['top1'] - res['top1']:.2f})", flush=True)

    retrained = None
    if args.epochs > 0:
        r = rmeeto.r_for_ratio(min(args.retrain_ratio, top), tokens, depth, protected=protected)
        free = next((s for s in sweep if s["r"] == r), None)
        with tempfile.TemporaryDirectory() as tmp:
            recipe = {k: v for k, v in load_yaml(args.recipe).items() if k != "method_opts"}  # r is set below
            cfg = make_config(common, recipe,
                              {"method": "rmeeto", "method_opts": {"r": r}, "finetune": args.checkpoint,
                               "teacher": args.checkpoint, "epochs": args.epochs, "output_dir": tmp},
                              parse_method_options(args.overrides))
            start = time.time()
            summary = train(cfg)
        retrained = dict(row(args.retrain_ratio, r, summary, dense, tokens, depth, protected), epochs=args.epochs,
                         training_free_top1=None if free is None else free["top1"],
                         train_img_per_s=round(summary["train_img_per_s"], 1), wall_s=round(time.time() - start, 1),
                         lr=summary["lr"], global_batch=summary["global_batch"])
        print(f"re-trained {args.epochs} epochs at r={r}: top-1 {summary['top1']:.2f}% "
              f"(drop {dense['top1'] - summary['top1']:.2f})", flush=True)

    data_name = "the bundled digits" if args.data_path == "digits" else Path(args.data_path).stem
    result = dict(data=data_name, model=base["model"], model_kwargs=base.get("model_kwargs", {}), img_size=dense["img_size"],
                  tokens=tokens, protected=protected, dense=dict(top1=round(dense["top1"], 2), gflops=round(dense["gflops"], 4)),
                  training_free=sweep, retrained=retrained, device=args.device)
    write_result(args.out, args.name, result, to_markdown(result))
    print(to_markdown(result))
    return 0


def row(ratio: float, r: int, res: dict[str, Any], dense: dict[str, Any], tokens: int, depth: int,
        protected: int) -> dict[str, Any]:
    return dict(ratio=ratio, r=r, reduction_ratio=round(rmeeto.ratio_for_r(r, tokens, depth, protected=protected), 4),
                top1=round(res["top1"], 2), drop=round(dense["top1"] - res["top1"], 2),
                gflops=round(res["gflops"], 4), flops_ratio=round(dense["gflops"] / res["gflops"], 3))


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"# R-MeeTo on {res['data']}: {res['model']} {res['model_kwargs']} at {res['img_size']} px "
             f"({res['tokens']} tokens)", "", f"Dense baseline: top-1 {res['dense']['top1']:.2f}%, "
             f"{res['dense']['gflops']:.4f} GFLOPs.", "", "Training-free (merge the dense weights, no training):", "",
             "| ratio | r | top-1 | drop | GFLOPs | FLOPs ratio |", "|---|---|---|---|---|---|"]
    for s in res["training_free"]:
        lines.append(f"| {s['reduction_ratio']:.2f} | {s['r']} | {s['top1']:.2f} | {s['drop']:.2f} | "
                     f"{s['gflops']:.4f} | {s['flops_ratio']:.2f} |")
    rt = res["retrained"]
    if rt:
        free = "n/a" if rt["training_free_top1"] is None else f"{rt['training_free_top1']:.2f}"
        lines += ["", f"Re-trained {rt['epochs']} epoch(s) at ratio {rt['reduction_ratio']:.2f} (r={rt['r']}), "
                  f"CE + 0.5 KL to the dense baseline, lr {rt['lr']:.2e} at global batch {rt['global_batch']}:", "",
                  "| | top-1 | drop vs dense |", "|---|---|---|",
                  f"| training-free | {free} | |",
                  f"| re-trained | {rt['top1']:.2f} | {rt['drop']:.2f} |",
                  "", f"Re-training: {rt['train_img_per_s']:.0f} img/s, {rt['wall_s']:.0f} s wall."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
