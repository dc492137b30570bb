"""One recipe over several seeds: mean, spread and per-seed rows of CIFAR-10 protocol results.

The runs must share everything but the seed (model, method options, epochs, lr, batch, test-set size, the
dense model's top-1): a summary over different recipes is refused, naming the field that differs. A result
written before the seed was recorded counts as seed 0. ``benchmarks/seed_summary.py`` is the command.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

SHARED = ("model", "model_kwargs", "img_size", "method", "method_opts", "epochs", "lr", "global_batch",
          "num_test_images")


def summarize(results: dict[str, dict[str, Any]], max_drop: float | None = None,
              min_reduction: float | None = None) -> dict[str, Any]:
    """Per-seed rows and their mean / sample standard deviation / range; ``max_drop`` and ``min_reduction``
    (a fraction) state a goal, counted per seed and on the mean."""
    if len(results) < 2:
        raise ValueError("a seed summary needs at least two results")
    first_name, first = next(iter(results.items()))
    for name, r in results.items():
        for key in SHARED:
            if r.get(key) != first.get(key):
                raise ValueError(f"{name} and {first_name} differ in {key!r}: {r.get(key)!r} vs {first.get(key)!r}")
        if r["dense"]["top1"] != first["dense"]["top1"]:
            raise ValueError(f"{name} and {first_name} were measured against different dense top-1s "
                             f"({r['dense']['top1']} vs {first['dense']['top1']})")
    seeds = [r.get("seed", 0) for r in results.values()]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    rows = [dict(source=name, seed=r.get("seed", 0), top1=r["dyvm"]["top1"], drop=r["dyvm"]["drop"],
                 flops_reduction=r["dyvm"]["flops_reduction"],
                 executed_directions=r["dyvm"]["realised_block_ratio"]) for name, r in results.items()]
    rows.sort(key=lambda row: row["seed"])

    def stats(key: str) -> dict[str, float]:
        vals = [row[key] for row in rows]
        return dict(mean=round(statistics.mean(vals), 4), std=round(statistics.stdev(vals), 4),
                    min=min(vals), max=max(vals))

    out = dict(benchmark="seed_summary", **{k: first.get(k) for k in SHARED}, dense_top1=first["dense"]["top1"],
               rows=rows, **{k: stats(k) for k in ("top1", "drop", "flops_reduction", "executed_directions")})
    if max_drop is not None or min_reduction is not None:
        def meets(drop: float, reduction: float) -> bool:
            return (max_drop is None or drop <= max_drop) and (min_reduction is None or reduction >= min_reduction)

        out["goal"] = dict(max_drop=max_drop, min_flops_reduction=min_reduction,
                           seeds_meeting=sum(meets(r["drop"], r["flops_reduction"]) for r in rows),
                           mean_meets=meets(out["drop"]["mean"], out["flops_reduction"]["mean"]))
    return out


def markdown(s: dict[str, Any]) -> str:
    lines = [f"# {s['method']} on CIFAR-10 over {len(s['rows'])} seeds", "",
             f"{s['model']} {s['model_kwargs']} at {s['img_size']} px; options {s['method_opts']}; {s['epochs']} "
             f"epochs, lr {s['lr']} at global batch {s['global_batch']}; {s['num_test_images']} test images; dense "
             f"top-1 {s['dense_top1']}.", "",
             "| seed | top-1 | drop | FLOPs reduction | executed directions | result |", "|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['seed']} | {r['top1']:.2f} | {r['drop']:.2f} | {100 * r['flops_reduction']:.1f} % | "
                     f"{r['executed_directions']:.3f} | `{Path(r['source']).name}` |")
    for label, f in (("mean", "mean"), ("std", "std")):
        lines.append(f"| **{label}** | {s['top1'][f]:.2f} | {s['drop'][f]:.2f} | "
                     f"{100 * s['flops_reduction'][f]:.1f} % | {s['executed_directions'][f]:.3f} | |")
    if "goal" in s:
        g = s["goal"]
        parts = ([f"drop <= {g['max_drop']}"] if g["max_drop"] is not None else []) + (
            [f">= {100 * g['min_flops_reduction']:.0f} % fewer FLOPs"] if g["min_flops_reduction"] is not None else [])
        lines += ["", f"Goal: {' at '.join(parts)}: met "
                      f"by {g['seeds_meeting']} of {len(s['rows'])} seeds; by the mean: "
                      f"{'yes' if g['mean_meets'] else 'no'} (mean drop {s['drop']['mean']:.2f}, range "
                      f"{s['drop']['min']:.2f}-{s['drop']['max']:.2f})."]
    return "\n".join(lines) + "\n"
