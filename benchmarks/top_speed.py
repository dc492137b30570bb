"""ToP real speed on one GPU: Vim-S at 224, bf16 autocast, batch 128, dense vs ToP in ONE process.

Rows: dense; ToP (after blocks 5, 10, 15, keep 0.8) without alignment, with 'hold' (R1) and with 'decay' (R2)
alignment; the norm-pruning baseline. Each configuration is timed with the engine's ``measure_throughput``
in interleaved rounds (median of the rounds' medians), so clock drift hits every row alike. The alignment
overhead is the time of ToP+alignment over ToP without it. Weights are random: the work per image does not
depend on them (the schedule keeps fixed counts).

    python benchmarks/top_speed.py --out benchmarks/results          # writes top_speed.{json,md}
"""
from __future__ import annotations

import argparse
import statistics

import torch

import mambatrim  # noqa: F401  (registers the models)
from mambatrim.analysis.flops import count_flops
from mambatrim.engine.benchmark import device_name, measure_throughput, resolve_device
from mambatrim.engine.report import write_result
from mambatrim.models.registry import create_model
from mambatrim.ops import get_backend
from mambatrim.reduce import apply_method

CONFIGS = [  # (row, method, options)
    ("dense", None, {}),
    ("ToP, no alignment", "top", dict(align=None)),
    ("ToP, align=hold (R1)", "top", dict(align="hold")),
    ("ToP, align=decay (R2)", "top", dict(align="decay")),
    ("norm pruning (plain)", "prune_norm", {}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vim_small_patch16_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 10, 15])
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    base = create_model(args.model).eval()
    models, flops = {}, {}
    for name, method, opts in CONFIGS:
        model = create_model(args.model).eval()
        model.load_state_dict(base.state_dict())
        if method:
            apply_method(model, method, layers=args.layers, keep=args.keep, **opts)
        flops[name] = count_flops(model, 224).gflops("paper")
        models[name] = model.to(dev)
    for model in models.values():  # compile/autotune every configuration's shapes before any timing
        measure_throughput(model, args.batch, 224, dev, args.dtype, warmup=args.warmup, iters=2)
    times: dict[str, list[float]] = {name: [] for name in models}
    last = {}
    for r in range(args.rounds):
        for name, model in models.items():
            res = measure_throughput(model, args.batch, 224, dev, args.dtype, warmup=2,
                                     iters=args.iters)
            times[name].append(res["median_ms"])
            last[name] = res
            print(f"round {r + 1} {name}: {res['img_per_s']:.0f} img/s ({res['median_ms']:.2f} ms)", flush=True)
    ms = {name: statistics.median(v) for name, v in times.items()}
    dense_ms = ms["dense"]
    rows = []
    for name, _, opts in CONFIGS:
        rows.append(dict(name=name, img_per_s=round(args.batch / (ms[name] / 1e3), 1), median_ms=round(ms[name], 3),
                         round_ms=[round(t, 3) for t in times[name]], speedup=round(dense_ms / ms[name], 3),
                         gflops=round(flops[name], 4), flops_ratio=round(flops["dense"] / flops[name], 3),
                         peak_mem_mib=last[name]["peak_mem_mib"]))
    plain = ms["ToP, no alignment"]
    overhead = {k: round(ms[k] / plain - 1, 4) for k in ("ToP, align=hold (R1)", "ToP, align=decay (R2)")}
    result = dict(model=args.model, batch=args.batch, dtype=args.dtype, img_size=224, layers=args.layers,
                  keep=args.keep, device=str(dev), device_name=device_name(dev), scan_backend=get_backend(dev.type),
                  torch=torch.__version__, rounds=args.rounds, iters=args.iters, rows=rows,
                  alignment_overhead_vs_plain_top=overhead)
    lines = [f"# ToP speed: {args.model}, 224 px, batch {args.batch}, {args.dtype}, {result['device_name']} "
             f"(scan backend {result['scan_backend']}, torch {torch.__version__})", "",
             f"Pruning after blocks {args.layers}, keep {args.keep}; median of {args.rounds} interleaved rounds of "
             f"{args.iters} timed iterations; random weights.", "",
             "| configuration | img/s | ms/batch | speed-up vs dense | GFLOPs (paper) | FLOPs ratio |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['img_per_s']:.0f} | {r['median_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['gflops']:.3f} | {r['flops_ratio']:.2f}x |")
    lines += ["", "Alignment overhead over ToP without alignment: " + ", ".join(
        f"{k}: {v:+.1%}" for k, v in overhead.items()) + "."]
    write_result(args.out, "top_speed", result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
