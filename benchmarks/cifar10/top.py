"""ToP CIFAR-10 protocol: ToP (alignment decay / hold / none) vs the plain-pruning baselines, same schedule.

Starts from a dense baseline checkpoint written by ``mambatrim train`` (it records its model and data settings).
Every number comes from the project's engine: ``evaluate_checkpoint`` (accuracy, FLOPs) for the training-free
rows and ``train`` for fine-tuning (recipe ``configs/top_cifar10.yaml``: the ToP ImageNet recipe scaled down).
The schedule defaults to ToP's (after blocks 5, 10, 15 of 24, keep 0.8) scaled to the model's depth.

    python benchmarks/cifar10/top.py --data-path cifar10.zip --checkpoint BASELINE.pth --epochs 2
    python benchmarks/cifar10/top.py --data-path digits --checkpoint digits_dense.pth --epochs 0   # quick check

Writes ``<name>.json`` and ``<name>.md`` into ``--out``.
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
from mambatrim.reduce import parse_method_options
from mambatrim.reduce.top import tokens_per_layer

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "top_cifar10.yaml"

VARIANTS: list[tuple[str, str, dict[str, Any]]] = [  # (row, method, options on top of the schedule)
    ("ToP, align=decay (R2)", "top", dict(align="decay")),
    ("ToP, align=hold (R1)", "top", dict(align="hold")),
    ("ToP, no alignment", "top", dict(align=None)),
    ("ToP, decay, unclipped score", "top", dict(align="decay", clip=False)),
    ("ToP, decay, cls at original place", "top", dict(align="decay", cls_placement="original")),
    ("ToP, hold, cls at original place", "top", dict(align="hold", cls_placement="original")),
    ("ToP, no alignment, cls at original place", "top", dict(align=None, cls_placement="original")),
    ("random pruning", "prune_random", {}),
    ("random pruning + align=decay", "prune_random", dict(align="decay")),
    ("static evenly-spread pruning", "prune_static", {}),
    ("norm pruning (plain)", "prune_norm", {}),
    ("norm pruning, cls at original place", "prune_norm", dict(cls_placement="original")),
    ("norm pruning, survivors ranked by score (EViT-style)", "prune_norm", dict(order="score")),
    ("random pruning, survivors ranked by score", "prune_random", dict(order="score")),
    # window selection (our extension): one drop per run of consecutive tokens, the run's lowest-scored
    ("ToP, no alignment, window selection", "top", dict(align=None, selection="window")),
    ("ToP, no alignment, window selection, cls at original place", "top",
     dict(align=None, selection="window", cls_placement="original")),
    ("ToP, align=hold, window selection", "top", dict(align="hold", selection="window")),
    ("ToP, align=decay, window selection", "top", dict(align="decay", selection="window")),
    ("norm pruning, window selection", "prune_norm", dict(selection="window")),
    ("random pruning, window selection", "prune_random", dict(selection="window")),
]
FINETUNED = ("ToP, align=decay (R2)", "ToP, align=hold (R1)", "norm pruning (plain)", "random pruning",
             "static evenly-spread pruning", "norm pruning, survivors ranked by score (EViT-style)")


def scaled_schedule(depth: int) -> list[int]:
    """ToP's pruning points (after blocks 5, 10, 15 of 24) at the same relative depths."""
    return sorted({max(1, min(depth - 1, round(depth * b / 24))) for b in (5, 10, 15)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="the CIFAR-10 zip (train/ and test/ class folders)")
    parser.add_argument("--checkpoint", required=True, help="dense baseline checkpoint (mambatrim train output)")
    parser.add_argument("--layers", type=int, nargs="+", help="prune before these blocks (default: scaled 5/10/15)")
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs per fine-tuned row (0: none)")
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="top_cifar10", help="output file stem")
    parser.add_argument("--only", nargs="+", help="run only the variants whose name contains one of these")
    args = parser.parse_args()

    base = baseline_settings(read_checkpoint(args.checkpoint))
    common = {**base, "data_path": args.data_path, "device": args.device, "progress": False}
    tokens, depth, protected = baseline_shape(base)
    schedule = dict(layers=args.layers or scaled_schedule(depth), keep=args.keep)
    counts = tokens_per_layer(tokens, depth, schedule["layers"], schedule["keep"], protected)
    dense = evaluate_checkpoint(make_config(common), args.checkpoint, throughput=False)
    print(f"dense: top-1 {dense['top1']:.2f}%  {dense['gflops']:.4f} GFLOPs", flush=True)

    result = dict(model=base["model"], model_kwargs=base.get("model_kwargs", {}), img_size=dense["img_size"],
                  data=Path(args.data_path).name, tokens=tokens, depth=depth, schedule=schedule,
                  tokens_per_layer=counts, dense=dict(top1=round(dense["top1"], 2), gflops=round(dense["gflops"], 5)),
                  rows=[], device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    for name, method, opts in VARIANTS:
        if args.only and not any(key in name for key in args.only):
            continue
        options = {**schedule, **opts}
        res = evaluate_checkpoint(make_config(common, {"method": method, "method_opts": options}), args.checkpoint,
                                  throughput=False)
        rows.append(dict(name=name, method=method, options=options, top1=round(res["top1"], 2),
                         drop=round(dense["top1"] - res["top1"], 2), gflops=round(res["gflops"], 5),
                         flops_reduction=round(1 - res["gflops"] / dense["gflops"], 4)))
        print(f"{name}: top-1 {res['top1']:.2f}% ({res['gflops']:.4f} GFLOPs)", flush=True)
        write(result, out, args.name)  # after every row: a cut-short run keeps what it measured
    for row in (r for r in rows if args.epochs > 0 and r["name"] in FINETUNED):
        with tempfile.TemporaryDirectory() as tmp:
            recipe = load_yaml(args.recipe)
            if row["method"] != recipe.get("method"):  # a baseline: none of ToP's recipe options (e.g. align)
                recipe.pop("method_opts", None)
            cfg = make_config(common, recipe,
                              {"method": row["method"], "method_opts": row["options"], "finetune": args.checkpoint,
                               "epochs": args.epochs, "output_dir": tmp}, parse_method_options(args.overrides))
            start = time.time()
            summary = train(cfg)
        row.update(top1_finetuned=round(summary["top1"], 2), finetune_epochs=args.epochs,
                   finetune_lr=summary["lr"], finetune_wall_s=round(time.time() - start, 1))
        print(f"{row['name']}: fine-tuned {args.epochs} epochs: top-1 {summary['top1']:.2f}%", flush=True)
        write(result, out, args.name)
    print(to_markdown(result))
    return 0


def write(result: dict[str, Any], out: Path, name: str) -> None:
    write_result(out, name, result, to_markdown(result))


def to_markdown(res: dict[str, Any]) -> str:
    sched = res["schedule"]
    lines = [f"# ToP vs plain token pruning: {res['model']} {res['model_kwargs']} at {res['img_size']} px, "
             f"{res['data']}", "",
             f"Dense: top-1 {res['dense']['top1']:.2f}%, {res['dense']['gflops']:.4f} GFLOPs. Every pruned row: "
             f"prune before blocks {sched['layers']} (0-based) keeping {sched['keep']:.0%} of the patch tokens; "
             f"tokens per block {res['tokens_per_layer']}.", "",
             "| variant | top-1 training-free | drop | GFLOPs | FLOPs reduction | top-1 fine-tuned |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ft = f"{r['top1_finetuned']:.2f} ({r['finetune_epochs']} ep)" if "top1_finetuned" in r else "-"
        lines.append(f"| {r['name']} | {r['top1']:.2f} | {r['drop']:.2f} | {r['gflops']:.4f} | "
                     f"{r['flops_reduction']:.1%} | {ft} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
