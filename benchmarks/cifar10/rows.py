"""CIFAR-10 protocol rows from a plan: any methods (combined ones included) from one dense baseline, each
evaluated training-free and re-trained with ONE recipe, so the rows compare at equal training.

A plan (YAML, ``benchmarks/cifar10/plans/``) names a recipe (e.g. ``configs/rmeeto_cifar10.yaml``: CE + 0.5 KL to
the frozen baseline), the re-training epochs, and rows ``{name, method, options}``. FLOPs of a re-trained row are
counted on the re-trained model (a learned policy such as DyVM's block selection sets its own). Every number
comes from the engine (``evaluate_checkpoint``, ``train``); the result is written after every row.

    python benchmarks/cifar10/rows.py --plan benchmarks/cifar10/plans/combine.yaml --data-path cifar10-jpeg.zip \
        --checkpoint benchmarks/cifar10/baseline_fp16.pth --out benchmarks/results

Writes ``<stem>.json`` and ``<stem>.md`` (stem from the plan, or ``--stem``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from mambatrim.engine.baseline import baseline_settings
from mambatrim.engine.config import load_yaml, make_config
from mambatrim.engine.evaluate import evaluate_checkpoint
from mambatrim.engine.report import write_result
from mambatrim.engine.train import train
from mambatrim.models.checkpoint import read_checkpoint
from mambatrim.reduce import parse_method_options

ROOT = Path(__file__).resolve().parents[2]
PLAN_KEYS = {"title", "stem", "recipe", "epochs", "rows", "notes"}


def read_plan(path: str) -> dict[str, Any]:
    plan = load_yaml(path)
    unknown = set(plan) - PLAN_KEYS
    if unknown:
        raise ValueError(f"plan {path}: unknown key(s) {sorted(unknown)}; valid: {sorted(PLAN_KEYS)}")
    for i, row in enumerate(plan.get("rows") or []):
        if set(row) - {"name", "method", "options"} or "name" not in row or "method" not in row:
            raise ValueError(f"plan {path}: row {i} must have name, method and optionally options, got {row}")
    if not plan.get("rows"):
        raise ValueError(f"plan {path} has no rows")
    return plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--data-path", required=True, help="the CIFAR-10 zip (train/ and test/ class folders)")
    parser.add_argument("--checkpoint", required=True, help="dense baseline checkpoint (mambatrim train output)")
    parser.add_argument("--epochs", type=int, default=None, help="override the plan's re-training epochs (0: none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a re-training config key (YAML value)")
    parser.add_argument("--only", nargs="+", help="run only the rows whose name contains one of these")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default=None)
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in <out>/<stem>.json (same plan and baseline) and run the rest")
    args = parser.parse_args()
    plan = read_plan(args.plan)
    epochs = plan.get("epochs", 0) if args.epochs is None else args.epochs
    recipe = {k: v for k, v in load_yaml(str(ROOT / plan["recipe"])).items() if k not in ("method", "method_opts")}

    base = baseline_settings(read_checkpoint(args.checkpoint))
    common = {**base, "data_path": args.data_path, "device": args.device, "progress": False}
    dense = evaluate_checkpoint(make_config(common), args.checkpoint, throughput=False)
    print(f"dense: top-1 {dense['top1']:.2f}%  {dense['gflops']:.4f} GFLOPs", flush=True)
    result = dict(title=plan.get("title", ""), notes=plan.get("notes", ""), model=base["model"],
                  model_kwargs=base.get("model_kwargs", {}), img_size=dense["img_size"], data=Path(args.data_path).name,
                  recipe=plan["recipe"], epochs=epochs, dense=dict(top1=round(dense["top1"], 2),
                                                                  gflops=round(dense["gflops"], 5)), rows=[])
    stem = args.stem or plan.get("stem") or Path(args.plan).stem
    if args.resume:
        result["rows"] = previous_rows(Path(args.out) / f"{stem}.json", result)
    for spec in plan["rows"]:
        if args.only and not any(key in spec["name"] for key in args.only):
            continue
        if any(row["name"] == spec["name"] for row in result["rows"]):
            print(f"{spec['name']}: kept from the previous run", flush=True)
            continue
        method, options = spec["method"], dict(spec.get("options") or {})
        free = evaluate_checkpoint(make_config(common, {"method": method, "method_opts": options}), args.checkpoint,
                                   throughput=False)
        row = dict(name=spec["name"], method=method, options=options, top1_free=round(free["top1"], 2),
                   gflops_free=round(free["gflops"], 5))
        print(f"{spec['name']}: training-free top-1 {free['top1']:.2f}% ({free['gflops']:.4f} GFLOPs)", flush=True)
        if epochs > 0:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = make_config(common, recipe, {"method": method, "method_opts": options, "finetune": args.checkpoint,
                                                   "teacher": args.checkpoint, "epochs": epochs, "output_dir": tmp},
                                  parse_method_options(args.overrides))
                start = time.time()
                summary = train(cfg)
                tuned = evaluate_checkpoint(make_config(common, {"method": method, "method_opts": options}),
                                            str(Path(tmp) / "last.pth"), throughput=False)
            row.update(top1=round(tuned["top1"], 2), gflops=round(tuned["gflops"], 5), lr=summary["lr"],
                       wall_s=round(time.time() - start, 1), train_img_per_s=round(summary["train_img_per_s"], 1))
            print(f"{spec['name']}: re-trained {epochs} epochs: top-1 {tuned['top1']:.2f}% "
                  f"({tuned['gflops']:.4f} GFLOPs)", flush=True)
        result["rows"].append(row)
        write_result(args.out, stem, result, to_markdown(result))
    print(to_markdown(result))
    return 0


def previous_rows(path: Path, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of an earlier run of the same plan on the same baseline (none if there is no such file)."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    same = all(old.get(k) == result[k] for k in ("model", "model_kwargs", "recipe", "epochs", "dense"))
    if not same:
        raise ValueError(f"--resume: {path} was written by another plan, baseline or epoch count; "
                         "remove it or pass another --stem")
    return list(old["rows"])


def to_markdown(res: dict[str, Any]) -> str:
    dense = res["dense"]
    lines = [f"# {res['title'] or 'CIFAR-10 protocol rows'}: {res['model']} {res['model_kwargs']} at "
             f"{res['img_size']} px, {res['data']}", "",
             f"Dense baseline: top-1 {dense['top1']:.2f}%, {dense['gflops']:.4f} GFLOPs (paper convention). "
             f"Re-training: {res['epochs']} epoch(s) of `{res['recipe']}` for every row (the baseline is the initial "
             f"weights and the frozen teacher). FLOPs of a re-trained row are counted on the re-trained model.", ""]
    if res["notes"]:
        lines += [res["notes"].strip(), ""]
    lines += ["| row | top-1 training-free | top-1 re-trained | drop (re-trained) | GFLOPs | FLOPs ratio |",
              "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        gflops = r.get("gflops", r["gflops_free"])
        tuned = f"{r['top1']:.2f}" if "top1" in r else "-"
        drop = f"{dense['top1'] - r['top1']:.2f}" if "top1" in r else "-"
        lines.append(f"| {r['name']} | {r['top1_free']:.2f} | {tuned} | {drop} | {gflops:.4f} | "
                     f"{dense['gflops'] / gflops:.3f}x |")
    lines += ["", "Rows (method options):", ""]
    lines += [f"- {r['name']}: `{r['method']}` {r['options']}" for r in res["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
