"""GroupMamba-T against Vim-S (the same ImageNet accuracy class: 83.3 % vs 80.5 %), same process: inference
(replayed from a CUDA graph, and eager) and an AdamW training step, bf16 autocast, interleaved rounds so clock
drift hits both alike; img/s is the median over rounds, with params and GFLOPs from the project's counter.

    python benchmarks/groupmamba_speed.py --out benchmarks/results                       # GPU: the issue's table
    python benchmarks/groupmamba_speed.py --device cpu --img-size 64 --batch-size 2 --rounds 1 --iters 1 \\
        --modes eager train --dtype fp32 --out check                                 # CPU smoke run

Writes ``STEM.json`` and ``STEM.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

import mambatrim  # noqa: F401  (registers the models)
from mambatrim.analysis import count_flops
from mambatrim.engine.benchmark import measure_throughput, resolve_device, run_environment
from mambatrim.models import create_model

MODELS = ("groupmamba_tiny", "vim_small_patch16_224")
MODES = ("cuda_graph", "eager", "train")


def build(name: str, img: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, img_size=img, drop_path_rate=0.0).to(device)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    models = {name: build(name, args.img_size, device) for name in args.models}
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {(n, m): [] for n in models for m in args.modes}
    for r in range(args.rounds):  # every (model, mode) once per round
        for (name, mode), runs in rows.items():
            result = measure_throughput(models[name], args.batch_size, args.img_size, device, args.dtype,
                                        warmup=args.warmup, iters=args.iters, train=mode == "train",
                                        cuda_graph=mode == "cuda_graph")
            runs.append(result)
            print(f"round {r} {name} {mode}: {result['img_per_s']:.1f} img/s", flush=True)
    table = []
    for (name, mode), runs in rows.items():
        flops = count_flops(models[name], args.img_size)
        table.append(dict(model=name, mode=mode, img_per_s=statistics.median(r["img_per_s"] for r in runs),
                          img_per_s_rounds=[r["img_per_s"] for r in runs],
                          peak_mem_mib=max((r["peak_mem_mib"] or 0) for r in runs) or None,
                          params_m=flops.params / 1e6, gflops_paper=flops.gflops("paper"),
                          gflops_full=flops.gflops("full")))
    return dict(benchmark="groupmamba_speed", img_size=args.img_size, batch_size=args.batch_size,
                dtype=args.dtype, rounds=args.rounds, iters=args.iters, rows=table,
                environment=run_environment(device))


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"# GroupMamba-T vs Vim-S: {result['img_size']} px, batch {result['batch_size']}, {result['dtype']}, "
             f"median of {result['rounds']} interleaved rounds", "",
             f"Device: {env.get('device_name', env.get('device'))}; torch {env.get('torch')}; "
             f"commit {env.get('commit')}; {env.get('date')}", "",
             "| model | mode | img/s | vs Vim-S | params (M) | GFLOPs paper / full | peak MiB |", "|---|---|---|---|---|---|---|"]
    base = {r["mode"]: r["img_per_s"] for r in result["rows"] if r["model"] == "vim_small_patch16_224"}
    for r in result["rows"]:
        ratio = f"{r['img_per_s'] / base[r['mode']]:.2f}x" if base.get(r["mode"]) else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['img_per_s']:.1f} | {ratio} | {r['params_m']:.2f} | "
                     f"{r['gflops_paper']:.2f} / {r['gflops_full']:.2f} | {r['peak_mem_mib'] or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stem", default="groupmamba_speed")
    args = ap.parse_args(argv)
    result = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
