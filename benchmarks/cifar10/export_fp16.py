"""Write a small fp16 copy of a training checkpoint: weights + the recorded config (no optimizer state).

    python benchmarks/cifar10/export_fp16.py RUN/best.pth benchmarks/cifar10/baseline_fp16.pth

The result loads with ``mambatrim.models.load_checkpoint`` (values are cast back to the model's dtype) and
``mambatrim eval --checkpoint`` reads the model/data settings from it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from mambatrim.engine.checkpointing import atomic_save
from mambatrim.models.checkpoint import read_checkpoint

KEEP = ("config", "num_classes", "img_size", "in_chans", "epoch", "global_step", "best_top1")


def main(src: str, dst: str) -> None:
    ckpt = read_checkpoint(src)
    model = {k: (v.half() if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    kept = {k: ckpt[k] for k in KEEP if k in ckpt}
    if "config" in kept:  # drop paths of the machine that trained it
        kept["config"] = {**kept["config"], "output_dir": None, "resume": None,
                          "data_path": Path(kept["config"].get("data_path") or "").name or None}
    atomic_save({"model": model, **kept}, dst)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
