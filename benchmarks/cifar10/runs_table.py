"""One protocol table from finished runs: ``mambatrim train`` output folders and ``mambatrim eval`` JSON outputs.

For rows made with the CLI itself (no method script), e.g. GroupMamba's dense, distilled, group-selection and
merging runs. Each row: top-1, drop against the dense row, GFLOPs per image (as the run counted them: executed
scans and surviving tokens) and their ratio to dense, and for training runs the recipe (epochs, lr, fine-tuned
from) and the evaluation curve.

    python benchmarks/cifar10/runs_table.py --name groupmamba_cifar10 --out benchmarks/results \\
        --title "GroupMamba-T on the CIFAR-10 protocol" --dense dense \\
        --row dense=RUN_DENSE --row "distilled (teacher: dense Vim)=RUN_DISTILL" \\
        --row "stage_merge keep 0.7, training-free=merge70.json" ...

Writes ``NAME.json`` and ``NAME.md``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from mambatrim.engine.report import write_result


def first_json_object(text: str) -> dict[str, Any]:
    """The first JSON object in ``text`` (``mambatrim eval`` prints its result after any log lines)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the eval output")
    obj, _ = json.JSONDecoder().raw_decode(text[start:])
    return obj


def load_row(path: Path) -> dict[str, Any]:
    """A row from a training run's folder (``summary.json``, ``config.yaml``, ``metrics.jsonl``) or an eval file."""
    if path.is_dir():
        summary = json.loads((path / "summary.json").read_text())
        config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").exists() else {}
        curve = []
        if (path / "metrics.jsonl").exists():
            for line in (path / "metrics.jsonl").read_text().splitlines():
                rec = json.loads(line)
                if rec.get("kind") == "eval":
                    curve.append({"epoch": rec["epoch"], "top1": rec["top1"]})
        return {"kind": "train", "top1": summary["top1"], "gflops": summary["gflops"], "params": summary["params"],
                "model": summary.get("model", config.get("model")), "method": summary.get("method"),
                "method_opts": config.get("method_opts") or summary.get("method_opts") or {},
                "epochs": summary.get("epochs_done"), "lr": summary.get("lr"),
                "finetune": bool(config.get("finetune")),
                "distill_mode": config.get("distill_mode") if config.get("teacher") else None,
                "device": summary.get("device_name"), "eval_curve": curve}
    if not path.is_file():
        raise FileNotFoundError(f"{path}: neither a run folder nor an eval output")
    result = first_json_object(path.read_text())
    return {"kind": "eval", "top1": result["top1"], "gflops": result["gflops"], "params": result["params"],
            "model": result.get("model"), "method": result.get("method"),
            "method_opts": result.get("method_opts") or {}, "epochs": 0}


def to_markdown(title: str, rows: dict[str, dict[str, Any]], notes: list[str]) -> str:
    lines = [f"# {title}", "",
             "| row | top-1 | drop vs dense | GFLOPs | FLOPs ratio | training | params (M) |",
             "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        if r["kind"] == "eval":
            training = "none (training-free)"
        else:
            parts = [f"{r['epochs']} ep" if r["epochs"] is not None else "",
                     f"lr {r['lr']:g}" if r["lr"] is not None else "",
                     "fine-tuned from dense" if r["finetune"] else ""]
            training = ", ".join(p for p in parts if p) or "-"
        lines.append(f"| {label} | {r['top1']:.2f} | {r['drop']:+.2f} | {r['gflops']:.3f} | {r['flops_ratio']:.3f}x | "
                     f"{training} | {r['params'] / 1e6:.2f} |")
    return "\n".join(lines) + "".join(f"\n\n{note}" for note in notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", action="append", required=True, metavar="LABEL=PATH",
                        help="a run folder or an eval output; repeat, in table order")
    parser.add_argument("--dense", required=True, help="the label of the dense row (drops and FLOPs ratios)")
    parser.add_argument("--title", required=True)
    parser.add_argument("--note", action="append", default=[], help="a line under the table; repeat")
    parser.add_argument("--name", required=True, help="output stem")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows: dict[str, dict[str, Any]] = {}
    for spec in args.row:
        label, sep, path = spec.rpartition("=")
        if not sep or not label:
            parser.error(f"--row takes LABEL=PATH, got {spec!r}")
        try:
            rows[label] = load_row(Path(path))
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--row {label!r}: {err}")
    if args.dense not in rows:
        parser.error(f"--dense names a row label; choose one of {sorted(rows)}")
    dense = rows[args.dense]
    for r in rows.values():
        r["drop"] = r["top1"] - dense["top1"]
        r["flops_ratio"] = dense["gflops"] / r["gflops"]
    record = {"title": args.title, "dense": args.dense, "rows": rows, "notes": args.note}
    write_result(args.out, args.name, record, to_markdown(args.title, rows, args.note))


if __name__ == "__main__":
    main()
