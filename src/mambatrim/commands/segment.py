"""``mambatrim train/eval --task segmentation``: the UperNet segmentation recipe (configs/seg_*.yaml).

The config is a :class:`~mambatrim.engine.segmentation.SegConfig`: ``--config FILE.yaml``, then the shared
options that mean the same here (``--model`` names the backbone, ``--input-size`` the crop), then ``--set``.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

# shared option (its argparse key and flag) -> SegConfig key
SHARED = {"model": ("--model", "backbone"), "model_kwargs": ("--model-opt", "model_kwargs"),
          "num_classes": ("--num-classes", "num_classes"), "drop_path": ("--drop-path", "drop_path"),
          "method": ("--method", "method"), "method_opts": ("--method-opt", "method_opts"),
          "finetune": ("--finetune", "pretrained"), "data_path": ("--data-path", "data_path"),
          "input_size": ("--input-size", "crop"), "batch_size": ("--batch-size", "batch_size"),
          "num_workers": ("--num-workers", "num_workers"), "lr": ("--lr", "lr"),
          "weight_decay": ("--weight-decay", "weight_decay"), "clip_grad": ("--clip-grad", "clip_grad"),
          "output_dir": ("--output-dir", "output_dir"), "seed": ("--seed", "seed"), "device": ("--device", "device")}
IGNORED = {"resume", "overrides", "config", "task", "func", "command", "eval", "progress", "dist_eval", "checkpoint",
           "use_ema", "throughput", "bench_batch", "json_out"}


def seg_config(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """defaults < ``base`` (a checkpoint's stored config) < --config < shared options < --set."""
    from ..engine.segmentation import load_seg_config
    from ..reduce import parse_method_options

    unused = sorted(k for k, v in vars(args).items() if v not in (None, False, [])
                    and k not in SHARED and k not in IGNORED and not (k == "amp"))
    if unused:
        raise ValueError(f"--task segmentation does not use {', '.join('--' + k.replace('_', '-') for k in unused)}; "
                         f"its options: {', '.join(flag for flag, _ in SHARED.values())}, --amp/--no-amp, "
                         "--resume, --config, --set KEY=VALUE")
    values: dict[str, Any] = dict(base or {})
    if args.config:
        from .._yaml import load_yaml_text

        with open(args.config) as fh:
            values.update(load_yaml_text(fh.read()) or {})
    for key, (_, target) in SHARED.items():
        value = getattr(args, key, None)
        if value is not None:
            values[target] = parse_method_options(value) if key in ("model_kwargs", "method_opts") else value
    if getattr(args, "amp", None) is False:
        values["dtype"] = "fp32"
    values.update(parse_method_options(getattr(args, "overrides", [])))
    return load_seg_config(None, values)


def run_train(args: argparse.Namespace) -> int:
    from ..engine.segmentation import train_segmentation

    summary = train_segmentation(seg_config(args), resume=args.resume)
    if summary["final"]:
        print(f"done: mIoU {100 * summary['final']['mIoU']:.2f}, pixel accuracy "
              f"{100 * summary['final']['aAcc']:.2f} after {summary['final']['iter']} iterations")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..engine.report import write_json
    from ..engine.segmentation import evaluate_checkpoint
    from ..models.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(args.checkpoint) if args.checkpoint else None
    cfg = seg_config(args, (checkpoint or {}).get("config"))
    result = evaluate_checkpoint(cfg, checkpoint)
    print(json.dumps({k: v for k, v in result.items() if k not in ("IoU", "Acc")}, indent=2, default=str))
    if getattr(args, "json_out", None):
        write_json(args.json_out, result)
    return 0
