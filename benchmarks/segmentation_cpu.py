"""Dense vs DyVM vs R-MeeTo on the bundled segmentation set: a short CPU fine-tune, mIoU and FLOPs.

A small UperNet-Vim (``--depth`` blocks of width ``--width``, 8x8 patches, ``--size`` crops: 16 tokens at
32x32 by default, sized for a shared 2-core CPU) is trained dense on the bundled generated set, then fine-tuned from that checkpoint for the same number of iterations four ways with the same
recipe: dense (the control: what the extra training alone gives), DyVM (rho 0.8, block target 0.8, the
authors' segmentation losses), R-MeeTo (merging with unmerge) and, without training, R-MeeTo applied to the
dense model. Every model is evaluated by slide inference on the validation split; FLOPs per image at the crop
(backbone by the analytical counter at the realised direction share, head by PyTorch's operator counter).

    PYTHONPATH=src python benchmarks/segmentation_cpu.py --out benchmarks/results

Writes ``segmentation_cpu.json`` and ``segmentation_cpu.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mambatrim.data.segmentation import SegmentationFolder, bundled_root, eval_transform
from mambatrim.engine.report import write_result
from mambatrim.engine.segmentation import (SegConfig, build_segmenter, evaluate_checkpoint, segmentation_flops,
                                           train_segmentation)



def methods(depth: int) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """Dense, DyVM (rho 0.8, block target 0.8, the authors' segmentation loss weights) and R-MeeTo, reducing
    before the blocks of the second, third and fourth quarter."""
    layers = [depth // 4, depth // 2, 3 * depth // 4]
    return {
        "dense": (None, {}),
        "dyvm": ("dyvm", {"keep": 0.8, "block_ratio": 0.8, "layers": layers, "token_loss_weight": 20.0,
                          "block_loss_weight": 20.0, "distill_weight": 0.0}),
        "rmeeto": ("rmeeto", {"r": 2, "layers": layers}),
    }


def base_config(args: argparse.Namespace, data: Path, out: Path) -> SegConfig:
    d = args.depth
    return SegConfig(backbone="vim_tiny_patch16_224", out_indices=[d // 4 - 1, d // 2 - 1, 3 * d // 4 - 1, d - 1],
                     model_kwargs=dict(depth=d, embed_dim=args.width, patch_size=8, stride=8),
                     head_channels=args.width, class_token=args.class_token, drop_path=0.0, data_path=str(data),
                     crop=args.size, scale=[4 * args.size, args.size], batch_size=args.batch_size, num_workers=0,
                     lr=args.lr, weight_decay=0.01, layer_decay=0.92, warmup_iters=args.iters // 10,
                     iters=args.iters, eval_interval=args.iters, slide_stride=2 * args.size // 3, dtype="fp32",
                     device="cpu", output_dir=str(out), log_interval=max(1, args.iters // 10), num_classes=14)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default="segmentation_cpu")
    parser.add_argument("--iters", type=int, default=80, help="dense pre-training iterations")
    parser.add_argument("--finetune-iters", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="crop side (8x8 patches)")
    parser.add_argument("--val", type=int, default=50, help="validation images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--class-token", action="store_true", help="keep Vim's class token in the backbone")
    parser.add_argument("--start", help="start from this dense checkpoint instead of pre-training (--iters: the "
                                        "iterations it was trained for)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = bundled_root(size=args.size, train=400, val=args.val)
    work = Path(tempfile.mkdtemp(prefix="segbench"))
    began = time.time()
    dense = base_config(args, data, work / "pretrain")
    table = methods(args.depth)
    if args.start:  # a dense checkpoint trained before (its iterations given by --iters)
        start = args.start
        runs: dict[str, Any] = {"pretrain": {"iters": args.iters, "checkpoint": args.start}}
    else:
        pre = train_segmentation(dense)
        runs = {"pretrain": {"iters": args.iters, "mIoU": pre["final"]["mIoU"], "aAcc": pre["final"]["aAcc"],
                             "wall_s": pre["wall_s"]}}
        start = str(work / "pretrain" / "last.pth")
    free = evaluate_checkpoint(dataclasses.replace(dense, method="rmeeto", method_opts=table["rmeeto"][1]),
                               torch.load(start, weights_only=True))
    runs["rmeeto_training_free"] = {**_row(free), "finetune_iters": 0, "wall_s": 0.0}
    for name, (method, opts) in table.items():
        cfg = dataclasses.replace(dense, method=method, method_opts=opts, finetune=start,
                                  iters=args.finetune_iters, eval_interval=args.finetune_iters,
                                  warmup_iters=args.finetune_iters // 10, output_dir=str(work / name),
                                  log_interval=max(1, args.finetune_iters // 10))
        summary = train_segmentation(cfg)
        model = build_segmenter(cfg, 14, torch.load(work / name / "last.pth", weights_only=True)["model"])
        images = torch.stack([SegmentationFolder(data, "val", eval_transform(tuple(cfg.scale)))[i][0]
                              for i in range(4)])
        runs[name] = {**summary["final"], **segmentation_flops(model.eval(), images), "method": method,
                      "method_opts": opts, "finetune_iters": args.finetune_iters, "wall_s": summary["wall_s"],
                      "train_log": summary["train_log"]}
    config = {**dataclasses.asdict(dense), "output_dir": "TMPDIR/pretrain", "data_path": "bundled set"}
    record = {"runs": runs, "config": config, "methods": table,
              "finetune_iters": args.finetune_iters, "data": data.name, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "threads": args.threads,
              "wall_s": time.time() - began}
    write_result(args.out, args.stem, record, _markdown(record))
    print(_markdown(record))


def _row(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("mIoU", "aAcc", "backbone_gflops", "head_gflops", "gflops", "method", "method_opts")
    return {k: result[k] for k in keys}


def _markdown(record: dict[str, Any]) -> str:
    runs, c = record["runs"], record["config"]
    dense = runs["dense"]
    lines = [
        "# Segmentation on the bundled set: dense vs DyVM vs R-MeeTo (CPU fine-tune)",
        "",
        f"UperNet on a small Vim (depth {c['model_kwargs']['depth']}, width {c['model_kwargs']['embed_dim']}, 8x8 "
        f"patches, {(c['crop'] // 8) ** 2} tokens at the {c['crop']}x{c['crop']} crop), bundled generated set "
        f"(400 train images, {c['num_classes']} classes), slide inference on the "
        f"validation images, class token {'kept' if c['class_token'] else 'none'}. Dense pre-training "
        f"{runs['pretrain']['iters']} iterations, then "
        f"{record['finetune_iters']} fine-tuning iterations per row from that checkpoint, same recipe; fp32, "
        f"{record['threads']} CPU threads, torch {record['torch']}. GFLOPs: multiply-adds per image at the crop.",
        "",
        "| model | fine-tune iters | mIoU | drop vs dense | pixel acc | backbone GFLOPs | backbone vs dense | "
        "head GFLOPs | total GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("dense", "dyvm", "rmeeto", "rmeeto_training_free"):
        r = runs[name]
        lines.append(f"| {name} {r['method_opts'] or ''} | {r['finetune_iters']} | {100 * r['mIoU']:.2f} | "
                     f"{100 * (r['mIoU'] - dense['mIoU']):+.2f} | {100 * r['aAcc']:.2f} | "
                     f"{r['backbone_gflops']:.5f} | {r['backbone_gflops'] / dense['backbone_gflops']:.3f} | "
                     f"{r['head_gflops']:.4f} | {r['gflops']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
