"""ToP real speed on one GPU: Vim-S at 224, bf16 autocast, batch 128, dense vs ToP in ONE process.

Rows: dense; ToP (after blocks 5, 10, 15, keep 0.8) without alignment, with 'hold' (R1) and with 'decay' (R2)
alignment; the norm-pruning baseline. Two modes: ``eager`` (plain launches) and ``cuda_graph`` (the whole
forward captured once per configuration and replayed, launch overhead removed; aligned ToP is capturable since
the fused aligned mixer never synchronises with the host). Every (mode, configuration) is timed with the
engine's ``interleaved_times_ms`` (median of the rounds), so clock drift hits every row alike.
The alignment overhead is the time of ToP+alignment over ToP without it, per mode. Weights are random: the work
per image does not depend on them (the schedule keeps fixed counts).

    python benchmarks/top_speed.py --out benchmarks/results          # writes top_speed.{json,md}
    python benchmarks/top_speed.py --device cpu --model vim_tiny_patch16_224 --img-size 64 --batch 2 \\
        --dtype fp32 --rounds 1 --iters 1 --warmup 1 --out /tmp/top_speed   # smoke run (eager only)
"""
from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext
from typing import Callable

import torch

import mambatrim  # noqa: F401  (registers the models)
from mambatrim.analysis.flops import count_flops
from mambatrim.engine.benchmark import DTYPES, device_name, interleaved_times_ms, resolve_device
from mambatrim.engine.cuda_graph import capture_graph
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
    ("ToP, align=hold, window selection", "top", dict(align="hold", selection="window")),
]
PLAIN, ALIGNED = "ToP, no alignment", ("ToP, align=hold (R1)", "ToP, align=decay (R2)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vim_small_patch16_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="forwards per timing round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 10, 15])
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--modes", nargs="+", default=["eager", "cuda_graph"], choices=["eager", "cuda_graph"],
                        help="cuda_graph needs a CUDA device (dropped on a CPU)")
    parser.add_argument("--device", default="auto", help="auto / cuda (the measurement) or cpu (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    dev = resolve_device(args.device)
    modes = [m for m in args.modes if m != "cuda_graph" or dev.type == "cuda"]
    if not modes:
        raise SystemExit("no mode left to time: cuda_graph needs a CUDA device (add --modes eager)")
    amp_dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    base = create_model(args.model, img_size=args.img_size).eval()
    models, flops = {}, {}
    for name, method, opts in CONFIGS:
        model = create_model(args.model, img_size=args.img_size).eval()
        model.load_state_dict(base.state_dict())
        if method:
            apply_method(model, method, layers=args.layers, keep=args.keep, **opts)
        flops[name] = count_flops(model, args.img_size).gflops("paper")
        models[name] = model.to(dev)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=dev)

    def forward_of(model: torch.nn.Module) -> Callable[[], None]:
        def forward() -> None:
            amp = torch.autocast(dev.type, dtype=amp_dtype, cache_enabled=False) if amp_dtype else nullcontext()
            with torch.no_grad(), amp:
                model(images)
        return forward

    # compile/autotune every configuration's shapes before any timing; peak memory of one eager forward
    peak: dict[str, float | None] = {}
    for name, model in models.items():
        fn = forward_of(model)
        for _ in range(args.warmup):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            fn()
            torch.cuda.synchronize(dev)
        peak[name] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None
    runners: dict[tuple[str, str], Callable[[], object]] = {}
    not_captured: dict[str, str] = {}
    for mode in modes:
        for name, model in models.items():
            if mode == "eager":
                runners[(mode, name)] = forward_of(model)
                continue
            try:
                runners[(mode, name)] = capture_graph(forward_of(model))
            except RuntimeError as err:  # a configuration that syncs with the host: reported, not timed
                not_captured[name] = str(err).splitlines()[0]
                print(f"cuda_graph {name}: not capturable ({not_captured[name]})", flush=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    times = interleaved_times_ms(runners, args.rounds, args.iters, dev, log=lambda r, key, ms: print(
        f"round {r + 1} {key[0]:>10} {key[1]}: {args.batch / ms * 1e3:.0f} img/s ({ms:.2f} ms)", flush=True))
    ms = {key: statistics.median(v) for key, v in times.items()}
    rows, overhead = [], {}
    for mode in modes:
        dense_ms = ms.get((mode, "dense"))
        for name, _, _ in CONFIGS:
            t = ms.get((mode, name))
            if t is None:
                rows.append(dict(mode=mode, name=name, not_captured=not_captured.get(name)))
                continue
            rows.append(dict(mode=mode, name=name, img_per_s=round(args.batch / (t / 1e3), 1), median_ms=round(t, 3),
                             round_ms=[round(v, 3) for v in times[(mode, name)]],
                             speedup=round(dense_ms / t, 3) if dense_ms else None,
                             gflops=round(flops[name], 4), flops_ratio=round(flops["dense"] / flops[name], 3),
                             peak_mem_mib=peak[name]))
        plain = ms.get((mode, PLAIN))
        overhead[mode] = {k: round(ms[(mode, k)] / plain - 1, 4) for k in ALIGNED
                          if plain and (mode, k) in ms}
    result = dict(model=args.model, batch=args.batch, dtype=args.dtype, img_size=args.img_size, layers=args.layers,
                  keep=args.keep, device=str(dev), device_name=device_name(dev), scan_backend=get_backend(dev.type),
                  torch=torch.__version__, rounds=args.rounds, iters=args.iters, modes=modes, rows=rows,
                  alignment_overhead_vs_plain_top=overhead, not_captured=not_captured)
    markdown = to_markdown(result)
    write_result(args.out, "top_speed", result, markdown)
    print(markdown)
    return 0


def to_markdown(res: dict) -> str:
    lines = [f"# ToP speed: {res['model']}, {res['img_size']} px, batch {res['batch']}, {res['dtype']}, "
             f"{res['device_name']} (scan backend {res['scan_backend']}, torch {res['torch']})", "",
             f"Pruning after blocks {res['layers']}, keep {res['keep']}; median of {res['rounds']} interleaved rounds "
             f"of {res['iters']} forwards (mean per round); random weights.", "",
             "`cuda_graph`: the whole forward captured once per configuration and replayed (launch overhead "
             "removed). `eager`: plain launches.", "",
             "| mode | configuration | img/s | ms/batch | speed-up vs dense | GFLOPs (paper) | FLOPs ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "median_ms" not in r:
            lines.append(f"| {r['mode']} | {r['name']} | not capturable | | | | |")
            continue
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"| {r['mode']} | {r['name']} | {r['img_per_s']:.0f} | {r['median_ms']:.2f} | {speedup} | "
                     f"{r['gflops']:.3f} | {r['flops_ratio']:.2f}x |")
    lines.append("")
    for mode, over in res["alignment_overhead_vs_plain_top"].items():
        lines.append(f"Alignment overhead over ToP without alignment ({mode}): " + ", ".join(
            f"{k}: {v:+.1%}" for k, v in over.items()) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
