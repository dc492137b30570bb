"""DyVM on the CIFAR-10 protocol: fine-tune from the dense baseline, report top-1 drop, FLOPs and real speed.

Starts from a dense CIFAR-10 baseline checkpoint written by ``mambatrim train`` (it records its model and data
settings). Fine-tunes with ``configs/dyvm_cifar10.yaml`` through the project's training engine (the baseline is
the initial weights and the frozen teacher), then, on the test set: top-1 of the deployed model (tokens
dropped, directions skipped per image), the executed-direction fraction the selectors actually chose, FLOPs
(paper convention, at that measured fraction, and the full count), and dense vs DyVM images/s on the first
``--bench-batch`` test images, bf16 autocast, interleaved timing rounds in one process.

    python benchmarks/dyvm_cifar10.py --data-path cifar10.zip --checkpoint BASELINE.pth --out benchmarks/results
    # control: another method at DyVM's schedule through the same recipe (its accuracy before fine-tuning too)
    python benchmarks/dyvm_cifar10.py ... --set method=prune_static \
        --set "method_opts={keep: 0.7, layers: [3, 6, 9]}" --stem dyvm_cifar10_static_control
    # control: the dense model itself fine-tuned with the same recipe (what the extra training alone gives)
    python benchmarks/dyvm_cifar10.py ... --set method=none --stem dense_control_dyvm_recipe

Writes ``dyvm_cifar10.json`` and ``dyvm_cifar10.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mambatrim.analysis.flops import count_flops
from mambatrim.data import build_data
from mambatrim.engine.benchmark import interleaved_times_ms
from mambatrim.engine.cuda_graph import capture_graph
from mambatrim.engine.baseline import baseline_settings
from mambatrim.engine.config import load_yaml, make_config, resolve_input
from mambatrim.engine.dyvm_eval import grid_agreement, measure
from mambatrim.engine.evaluate import build_evaluated_model
from mambatrim.engine.report import write_result
from mambatrim.engine.train import train
from mambatrim.models.checkpoint import read_checkpoint
from mambatrim.reduce import dyvm, parse_method_options

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "dyvm_cifar10.yaml"


def speed(models: dict[str, torch.nn.Module], images: torch.Tensor, rounds: int = 5, iters: int = 20) -> dict:
    """Images/s per model on the same real images, bf16 autocast, interleaved rounds, median; eager and
    replayed from a CUDA graph (``NAME (CUDA graph)``: every DyVM path has static shapes, no host sync)."""
    def fn(model: torch.nn.Module):
        def run() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(images)
        return run

    runs = {name: fn(model) for name, model in models.items()}
    for name, model in models.items():
        try:
            runs[f"{name} (CUDA graph)"] = capture_graph(fn(model))
        except RuntimeError as err:  # a control method whose forward synchronises: eager numbers only
            print(f"{name}: no CUDA graph ({err})", file=sys.stderr)
    for run in runs.values():
        for _ in range(5):
            run()
    times = interleaved_times_ms(runs, rounds, iters, images.device)
    return {k: round(images.shape[0] / statistics.median(v) * 1000.0, 1) for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="the CIFAR-10 zip (train/ and test/ class folders)")
    parser.add_argument("--checkpoint", required=True, help="dense baseline checkpoint (mambatrim train output)")
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a fine-tuning config key (YAML value)")
    parser.add_argument("--bench-batch", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work-dir", default=None, help="keep the fine-tuned checkpoint here (default: temp)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default="dyvm_cifar10", help="result file names: STEM.json / STEM.md")
    parser.add_argument("--no-speed", action="store_true",
                        help="skip the speed measurement (e.g. while other jobs share the GPU)")
    parser.add_argument("--tuned", default=None, metavar="CHECKPOINT",
                        help="evaluate this fine-tuned checkpoint (a --work-dir's last.pth) instead of fine-tuning")
    args = parser.parse_args()

    base = baseline_settings(read_checkpoint(args.checkpoint))
    common = {**base, "data_path": args.data_path, "device": args.device, "progress": False}
    recipe = load_yaml(args.recipe)
    overrides = parse_method_options(args.overrides)
    if "method" in overrides and overrides["method"] in (None, "none"):  # the dense control: the same recipe
        del overrides["method"]
        recipe.pop("method", None)
        recipe.pop("method_opts", None)
    if overrides.get("method", recipe.get("method")) != recipe.get("method"):
        recipe.pop("method_opts", None)  # another method: only its own options
    extra: dict[str, Any] = {"epochs": args.epochs} if args.epochs else {}
    if args.tuned:  # a fine-tune done earlier: its own recorded config and training summary
        tuned = read_checkpoint(args.tuned)
        cfg = make_config(common, recipe, {k: v for k, v in (tuned.get("config") or {}).items()
                                           if k in ("method", "method_opts", "epochs", "lr")}, overrides)
        summary = dict(tuned.get("train_summary") or {})
        wall = summary.pop("wall_s", float("nan"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work_dir or tmp)
            cfg = make_config(common, recipe, {"finetune": args.checkpoint, "teacher": args.checkpoint,
                                               "output_dir": str(work)}, extra, overrides)
            start = time.time()
            summary = train(cfg)
            wall = time.time() - start
            tuned = read_checkpoint(work / "last.pth")
            if args.work_dir:  # what a later --tuned run reports as the fine-tune
                torch.save({"model": tuned["model"], "config": tuned.get("config"),
                            "train_summary": {**{k: summary.get(k) for k in ("lr", "global_batch", "train_img_per_s",
                                                                             "stopped_early", "global_step")},
                                              "wall_s": round(wall, 1)}}, work / "tuned.pth")

    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    in_chans, size = resolve_input(cfg)
    opts = cfg.data_options(in_chans)
    opts.input_size = size
    data = build_data(opts, device, with_train=False)
    dense_cfg = make_config(common)
    dense = build_evaluated_model(dense_cfg, read_checkpoint(args.checkpoint), data.num_classes, in_chans,
                                  data.input_size).to(device).eval()
    tuned_cfg = make_config(common, {"method": cfg.method, "method_opts": cfg.method_opts})
    student = build_evaluated_model(tuned_cfg, tuned, data.num_classes, in_chans, data.input_size).to(device)
    student = dyvm.deploy(student) if cfg.method == "dyvm" else student.eval()
    amp = cfg.amp and device.type == "cuda"
    dense_eval, dyvm_eval = measure(dense, data.val, device, amp), measure(student, data.val, device, amp)
    grid = grid_agreement(student, data.val, device, amp) if cfg.method == "dyvm" else None
    dense_flops = count_flops(dense, data.input_size)
    if cfg.method == "dyvm":
        measured = dyvm.count_flops(student, data.input_size, block_ratio=dyvm_eval["block_ratio"])
        nominal = dyvm.count_flops(student, data.input_size, block_ratio=cfg.method_opts.get("block_ratio", 0.8))
    else:  # a control (e.g. prune_static at DyVM's schedule): its FLOPs, and its accuracy before fine-tuning
        measured = nominal = count_flops(student, data.input_size)
        untuned = build_evaluated_model(tuned_cfg, read_checkpoint(args.checkpoint), data.num_classes, in_chans,
                                        data.input_size).to(device)
        dyvm_eval["top1_training_free"] = measure(untuned, data.val, device, amp)["top1"]
    bench = None
    if device.type == "cuda" and not args.no_speed:
        images = next(iter(data.val))[0][: args.bench_batch]
        while images.shape[0] < args.bench_batch:
            images = torch.cat([images, images])[: args.bench_batch]
        bench = speed({"dense": dense, "dyvm": student}, images)

    result = dict(
        model=base["model"], model_kwargs=base.get("model_kwargs", {}), img_size=data.input_size,
        method_opts=cfg.method_opts, epochs=cfg.epochs, lr=summary.get("lr"), global_batch=summary.get("global_batch"),
        train_img_per_s=summary.get("train_img_per_s"), fine_tune_wall_s=round(wall, 1),
        tokens_per_layer=measured.tokens_per_layer,
        dense=dict(top1=round(dense_eval["top1"], 2), gflops=round(dense_flops.gflops("paper"), 4),
                   gflops_full=round(dense_flops.gflops("full"), 4)),
        method=cfg.method, top1_training_free=dyvm_eval.get("top1_training_free"),
        dyvm=dict(top1=round(dyvm_eval["top1"], 2), drop=round(dense_eval["top1"] - dyvm_eval["top1"], 2),
                  realised_block_ratio=round(dyvm_eval["block_ratio"], 4),
                  direction_rates={i: [round(r, 4) for r in v] for i, v in dyvm_eval["direction_rates"].items()},
                  gflops=round(measured.gflops("paper"), 4), gflops_full=round(measured.gflops("full"), 4),
                  gflops_at_nominal_block_ratio=round(nominal.gflops("paper"), 4),
                  flops_reduction=round(1 - measured.gflops("paper") / dense_flops.gflops("paper"), 4)),
        speed=None if bench is None else dict(
            bench_batch=args.bench_batch, dtype="bf16 autocast", device=torch.cuda.get_device_name(),
            dense_img_per_s=bench["dense"], dyvm_img_per_s=bench["dyvm"],
            speedup=round(bench["dyvm"] / bench["dense"], 3),
            dense_img_per_s_graph=bench["dense (CUDA graph)"], dyvm_img_per_s_graph=bench.get("dyvm (CUDA graph)"),
            speedup_graph=round(bench.get("dyvm (CUDA graph)", float("nan")) / bench["dense (CUDA graph)"], 3),
            flops_ratio=round(dense_flops.gflops("paper") / measured.gflops("paper"), 3)),
        num_test_images=dyvm_eval["num_images"], seed=cfg.seed, grid_agreement=grid)
    if summary.get("stopped_early"):  # a time limit ended the fine-tune: say how far it got
        result["stopped_early"] = (f"the fine-tune hit its time limit after {summary.get('global_step')} steps "
                                   f"(of {cfg.epochs} epochs); the checkpoint of that step was evaluated")
    write_result(args.out, args.stem, result, to_markdown(result))
    print(to_markdown(result))
    return 0


def to_markdown(r: dict[str, Any]) -> str:
    d, y, s = r["dense"], r["dyvm"], r["speed"]
    lines = [
        f"# DyVM on CIFAR-10: {r['model']} {r['model_kwargs']} at {r['img_size']} px",
        "",
        f"Fine-tuned {r['epochs']} epochs from the dense baseline (also the teacher), options {r['method_opts']}, "
        f"lr {r['lr']} at global batch {r['global_batch']}, seed {r.get('seed', 0)}; {r['fine_tune_wall_s']:.0f} s wall "
        f"({r['train_img_per_s'] or 0:.0f} img/s). Test set: {r['num_test_images']} images.",
        "",
        "| model | top-1 | drop | GFLOPs (paper) | FLOPs reduction | GFLOPs (full) | executed directions |",
        "|---|---|---|---|---|---|---|",
        f"| dense | {d['top1']:.2f} | | {d['gflops']:.4f} | | {d['gflops_full']:.4f} | 1.000 |",
        f"| {r.get('method') or 'dense, fine-tuned (control)'} | {y['top1']:.2f} | {y['drop']:.2f} | "
        f"{y['gflops']:.4f} | "
        f"{100 * y['flops_reduction']:.1f}% | {y['gflops_full']:.4f} | {y['realised_block_ratio']:.3f} |",
        "",
        f"Tokens per layer: {r['tokens_per_layer']}. GFLOPs at the nominal block ratio: "
        f"{y['gflops_at_nominal_block_ratio']:.4f}.",
    ]
    rates = y.get("direction_rates") or {}
    if rates:
        flat = [x for v in rates.values() for x in v]
        settled = sum(1 for x in flat if x <= 0.05 or x >= 0.95)
        lines += ["", "Share of test images running each layer's forward / backward scan: "
                      + ", ".join(f"{i}: {v[0]:.2f} / {v[1]:.2f}" for i, v in rates.items())
                      + f". {settled} of {len(flat)} (layer, direction) pairs are settled (<= 0.05 or >= 0.95)."]
    grid = r.get("grid_agreement")
    if grid:
        lines += ["", "Kept patch tokens on the coverage prior's evenly spread grid, per pruning stage: "
                      + " / ".join(f"{x:.3f}" for x in grid["on_grid_share"])
                      + f" (1.000: the kept set is static pruning's; top-1 of that pass {grid['top1']:.2f})."]
    if r.get("stopped_early"):
        lines += ["", f"Stopped early: {r['stopped_early']}."]
    if r.get("top1_training_free") is not None:
        lines += ["", f"Before fine-tuning (training-free): top-1 {r['top1_training_free']:.2f}."]
    if s:
        lines += ["", f"Speed ({s['device']}, {s['dtype']}, batch {s['bench_batch']} test images): dense "
                      f"{s['dense_img_per_s']:.0f} img/s, DyVM {s['dyvm_img_per_s']:.0f} img/s, speedup "
                      f"{s['speedup']:.3f}x; under CUDA graphs dense {s['dense_img_per_s_graph']:.0f} img/s, DyVM "
                      f"{s['dyvm_img_per_s_graph'] or float('nan'):.0f} img/s, speedup {s['speedup_graph']:.3f}x "
                      f"(FLOPs ratio {s['flops_ratio']:.3f})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
