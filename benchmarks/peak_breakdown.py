"""What is live at the whole-run peak of a CUDA-graph inference measurement, Vim against DeiT.

    python benchmarks/peak_breakdown.py --configs 1024:8,224:128 --out benchmarks/results

The resolution sweep's "peak MiB" is ``max_memory_allocated`` over ``measure_throughput(..., cuda_graph=True)``:
weights, inputs, warm-up and graph capture. This records the caching allocator's history over that same call
(``torch.cuda.memory._record_memory_history``), replays it to the moment of the most bytes allocated, and groups
the blocks live then by where they were allocated (the innermost frames in mambatrim, timm or torch.nn) and by
phase (warm-up on the side stream, graph capture, or outside both: weights and inputs).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from resolution_sweep import build  # noqa: E402


def _capture_line() -> int:
    """The line of ``capture_graph`` that opens the capture: frames below it are the capture, above the warm-up."""
    import inspect

    from mambatrim.engine import cuda_graph

    lines, first = inspect.getsourcelines(cuda_graph.capture_graph)
    return first + next(i for i, line in enumerate(lines) if "torch.cuda.graph(" in line)


def _site(event: dict, capture_line: int) -> tuple[str, str]:
    """(phase, call site) of an allocation event from its Python frames."""
    frames = event.get("frames", [])
    phase = "outside"
    for f in frames:
        if f["name"] == "capture_graph":
            phase = "capture" if f["line"] >= capture_line else "warm-up"
    inner = [f for f in frames if any(k in f["filename"] for k in ("mambatrim", "timm", "torch/nn"))]
    where = " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in inner[:3])
    return phase, where or (f"{frames[0]['filename']}:{frames[0]['line']}" if frames else "no frames")


def peak_live(trace: list[dict]) -> tuple[int, dict]:
    """Bytes allocated at the history's peak and the blocks live then (address -> alloc event)."""
    live: dict = {}
    total = peak = 0
    at_peak: dict = {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
    return peak, at_peak


def breakdown(name: str, img: int, bsz: int) -> dict:
    from mambatrim.engine.benchmark import measure_throughput
    from mambatrim.ops import use_backend

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = build(name, img).cuda()
    weights = torch.cuda.memory_allocated() - before
    base = torch.cuda.memory_allocated()  # allocated before the history starts: in no trace event
    torch.cuda.memory._record_memory_history(max_entries=500000, stacks="python")
    try:
        with use_backend("triton"):
            r = measure_throughput(model, bsz, img, "cuda", "bf16", warmup=2, iters=3, cuda_graph=True)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, live = peak_live(snap["device_traces"][torch.cuda.current_device()])
    groups: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    capture_line = _capture_line()
    for ev in live.values():
        key = _site(ev, capture_line)
        groups[key] += ev["size"]
        counts[key] += 1
    model = snap = None
    torch.cuda.empty_cache()
    return {"model": name, "img": img, "batch": bsz, "weights_mib": weights / 2**20,
            "peak_mem_mib": r["peak_mem_mib"], "history_peak_mib": (base + peak) / 2**20,
            "live": [{"phase": k[0], "site": k[1], "mib": v / 2**20, "blocks": counts[k]}
                     for k, v in groups.most_common()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="1024:8", help="IMG:BATCH items, comma-separated")
    ap.add_argument("--models", default="vim_small,deit_small")
    ap.add_argument("--top", type=int, default=15, help="call sites listed per model and configuration")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="peak_breakdown")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (the CUDA caching allocator's history)")
    try:
        configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    except ValueError:
        ap.error(f"--configs {args.configs!r}: expected IMG:BATCH[,...]")
    from mambatrim.engine.benchmark import device_name

    rows = [breakdown(m, img, bsz) for img, bsz in configs for m in args.models.split(",")]
    out = {"device": device_name(torch.device("cuda")), "torch": torch.__version__, "rows": rows}
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    lines = [f"# What is live at the whole-run peak ({out['device']})", "",
             f"torch {out['torch']}; bf16, `measure_throughput(..., cuda_graph=True)` (warm-up 2, 3 timed replays). "
             "MiB of the blocks live at the allocator history's peak, by phase and call site.", ""]
    for r in rows:
        lines += [f"## {r['model']}, {r['img']} px, batch {r['batch']}: peak {r['peak_mem_mib']:,.0f} MiB "
                  f"(from the history: {r['history_peak_mib']:,.0f}, of which weights {r['weights_mib']:,.0f}, "
                  "not listed below)", "",
                  "| MiB | blocks | phase | call site |", "|---|---|---|---|"]
        lines += [f"| {x['mib']:,.1f} | {x['blocks']} | {x['phase']} | `{x['site']}` |" for x in r["live"][:args.top]]
        lines.append("")
    (dest / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
