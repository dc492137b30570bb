"""Vim-Ti forward throughput on the CPU: the blocked ``torch`` scan backend against the sequential ``ref``.

Both backends run in ONE process, interleaved in rounds (torch, ref, torch, ref, ...) so that clock drift and
load from other processes hit both alike; each backend's images/s is batch / median of all its timed
iterations (``mambatrim.engine.benchmark.measure_throughput``). A scan-only comparison at Vim-Ti's shapes (one
direction, b=8, d_inner=384, L=197, d_state=16, inputs laid out as the mixer hands them over) is measured the
same way. Writes ``cpu_forward.json`` and ``cpu_forward.md`` into ``--out``.

    python benchmarks/cpu_forward.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from mambatrim.engine.benchmark import measure_throughput
from mambatrim.engine.report import write_result
from mambatrim.models import create_model
from mambatrim.ops import selective_scan, use_backend

BACKENDS = ("torch", "ref")


def forward_rounds(batch: int, rounds: int, iters: int, warmup: int) -> dict[str, dict]:
    model = create_model("vim_tiny_patch16_224")
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    last: dict[str, dict] = {}
    for _ in range(rounds):
        for backend in BACKENDS:
            with use_backend(backend):
                res = measure_throughput(model, batch, 224, "cpu", "fp32", warmup=warmup, iters=iters)
            times[backend] += res["times_ms"]
            last[backend] = res
    out = {}
    for backend in BACKENDS:
        median = statistics.median(times[backend])
        out[backend] = {"img_per_s": batch / (median / 1e3), "median_ms": median, "iters": len(times[backend]),
                        "min_ms": min(times[backend]), "max_ms": max(times[backend])}
    return out


def scan_rounds(rounds: int, iters: int) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(0)
    b, d, length, n = 8, 384, 197, 16

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    # (b, L, d) memory viewed as (b, d, L): the layout the mixer passes
    u, delta, z = (rand(b, length, d).transpose(1, 2) for _ in range(3))
    B, C = (rand(b, length, n).transpose(1, 2) for _ in range(2))
    A, D, bias = -torch.rand(d, n, generator=gen) * 4, rand(d), rand(d)
    times: dict[str, list[float]] = {k: [] for k in BACKENDS}
    with torch.no_grad():
        for _ in range(rounds):
            for backend in BACKENDS:
                selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)  # warm-up
                for _ in range(iters):
                    t0 = time.perf_counter()
                    selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)
                    times[backend].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "iters": len(v)} for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=6, help="timed forwards per backend per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per backend per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    scan = scan_rounds(args.rounds, args.iters * 5)
    forward = forward_rounds(args.batch_size, args.rounds, args.iters, args.warmup)
    load_after = os.getloadavg()
    result = {
        "model": "vim_tiny_patch16_224", "img_size": 224, "batch_size": args.batch_size, "dtype": "fp32",
        "forward": forward,
        "forward_ratio_torch_over_ref": forward["torch"]["img_per_s"] / forward["ref"]["img_per_s"],
        "scan_one_direction": scan,
        "scan_ratio_torch_over_ref": scan["ref"]["median_ms"] / scan["torch"]["median_ms"],
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
    }
    f, s = result["forward"], result["scan_one_direction"]
    md = [
        f"# Vim-Ti CPU forward, batch {args.batch_size}, fp32, 224x224 ({result['cpu_count']} CPU cores, "
        f"{result['threads']} threads, torch {result['torch']})",
        "",
        "| backend | forward img/s | forward median ms | one-direction scan median ms |",
        "|---|---|---|---|",
        *(f"| {k} | {f[k]['img_per_s']:.2f} | {f[k]['median_ms']:.0f} | {s[k]['median_ms']:.1f} |" for k in BACKENDS),
        "",
        f"torch / ref: forward {result['forward_ratio_torch_over_ref']:.2f}x, "
        f"scan {result['scan_ratio_torch_over_ref']:.2f}x (interleaved in one process; "
        f"{f['torch']['iters']} timed forwards per backend; 1-min load average of the shared machine "
        f"{load_before[0]:.1f} -> {load_after[0]:.1f}).",
        "",
    ]
    write_result(args.out, "cpu_forward", result, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
