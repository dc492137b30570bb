"""Where R-MeeTo's GPU time goes: CUDA kernel time of one Vim-S forward (bf16, batch 128), dense vs merged.

Runs the eager forward under ``torch.profiler`` and sums the device time of every kernel, split into the merge
events (``rmeeto_merge`` ranges) and everything else, then lists the costliest kernels of each. Writes
``rmeeto_profile.md`` into ``--out``.

    python benchmarks/rmeeto_profile.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import mambatrim  # noqa: F401
from mambatrim.models.registry import create_model
from mambatrim.reduce import rmeeto
from mambatrim.reduce.rmeeto import RMeeToReducer


class TimedReducer(RMeeToReducer):
    def before_layer(self, layer_idx, state):
        if layer_idx not in self.layers:
            return state
        with record_function("rmeeto_merge"):
            return super().before_layer(layer_idx, state)


def kernel_times(model, images, reps: int = 3) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """(total ms, merge ms, per-kernel ms outside merges, per-kernel ms inside) per forward."""
    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(images)
    for _ in range(3):
        fwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fwd()
        torch.cuda.synchronize()
    inside: dict[str, float] = defaultdict(float)
    outside: dict[str, float] = defaultdict(float)
    total = merge = 0.0
    for e in prof.events():  # CPU ops; each carries the device time of the kernels it launched itself
        dur = getattr(e, "self_device_time_total", 0.0)
        if not dur or e.name == "rmeeto_merge":
            continue
        total += dur
        parent, in_merge = e.cpu_parent, False
        while parent is not None and not in_merge:
            in_merge = parent.name == "rmeeto_merge"
            parent = parent.cpu_parent
        if in_merge:
            inside[e.name] += dur
            merge += dur
        else:
            outside[e.name] += dur
    n = 1000.0 * reps
    return total / n, merge / n, {k: v / n for k, v in outside.items()}, {k: v / n for k, v in inside.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, default=0.31)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model("vim_small_patch16_224").cuda().eval()
    images = torch.randn(args.batch_size, 3, 224, 224, device="cuda")
    dense = kernel_times(model, images)
    r = rmeeto.r_for_ratio(args.ratio)
    model.set_reducer(TimedReducer(r, rmeeto.merge_layers(24)))
    merged = kernel_times(model, images)
    lines = [f"# R-MeeTo GPU kernel time: Vim-S, bf16, batch {args.batch_size}, ratio {args.ratio} (r={r})", "",
             "Sum of CUDA kernel durations per forward, by launching op (eager, torch.profiler; launch gaps excluded).", "",
             "| | total ms | in merge events ms | rest ms |", "|---|---|---|---|",
             f"| dense | {dense[0]:.2f} | 0 | {dense[0]:.2f} |",
             f"| R-MeeTo | {merged[0]:.2f} | {merged[1]:.2f} | {merged[0] - merged[1]:.2f} |", "",
             "Costliest ops inside the merge events (ms per forward, all 11 events):", "",
             "| op | ms |", "|---|---|"]
    for name, ms in sorted(merged[3].items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"| `{name}` | {ms:.3f} |")
    lines += ["", "Costliest ops outside the merges, dense vs R-MeeTo (ms per forward):", "",
              "| op | dense | R-MeeTo |", "|---|---|---|"]
    for name, ms in sorted(dense[2].items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"| `{name}` | {ms:.3f} | {merged[2].get(name, 0.0):.3f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rmeeto_profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
