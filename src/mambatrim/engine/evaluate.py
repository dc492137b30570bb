"""Accuracy of a model on an evaluation loader; exact over ranks (sharded without padding, counts summed)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .build import build_from_config
from .config import resolve_input
from .distributed import all_reduce_sum
from .precision import autocast


def view_averaged_logits(model: nn.Module, images: Tensor) -> Tensor:
    """float logits; a batch of multi-view clips (B, V, C, T, H, W) gets each video's V views' logits averaged
    (multi-clip x multi-crop evaluation)."""
    if images.dim() != 6:
        return model(images).float()
    batch, views = images.shape[:2]
    return model(images.flatten(0, 1)).float().view(batch, views, -1).mean(1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device, dtype: str = "fp32",
             progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """top-1 / top-5 (%) and mean cross-entropy over every sample of every rank, under ``dtype`` autocast."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    batches: Any = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    try:
        for images, targets in batches:
            with autocast(device, dtype):
                logits = view_averaged_logits(model, images)
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top.eq(targets[:, None])
            correct1 += float(hits[:, 0].sum())
            correct5 += float(hits.any(1).sum())
            count += targets.shape[0]
    finally:
        model.train(was_training)
    correct1, correct5, loss_sum, count = all_reduce_sum([correct1, correct5, loss_sum, count], device)
    if count == 0:
        raise ValueError("the evaluation data is empty")
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss_sum / count,
            "num_images": int(count)}


def config_from_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The model/data settings a mambatrim training checkpoint recorded (empty for foreign checkpoints)."""
    cfg = checkpoint.get("config") or {}
    keys = ("model", "model_kwargs", "method", "method_opts", "data_path", "in_chans", "input_size", "num_classes",
            "crop_pct", "mean", "std", "task", "num_frames")
    out = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    for key in ("num_classes", "in_chans"):
        if checkpoint.get(key) is not None:
            out[key] = checkpoint[key]
    if checkpoint.get("img_size") is not None:
        out["input_size"] = checkpoint["img_size"]
    return out


def build_evaluated_model(cfg: Any, checkpoint: dict[str, Any] | None, num_classes: int, in_chans: int,
                          img_size: int, use_ema: bool = False) -> nn.Module:
    """Model + method + weights, loaded in the order the checkpoint needs (see ``build.build_model``)."""
    return build_from_config(cfg, num_classes, in_chans, img_size, checkpoint, use_ema=use_ema)


def evaluate_checkpoint(cfg: Any, checkpoint_path: str | None, use_ema: bool = False, throughput: bool = True,
                        bench_batch: int = 64, bench_iters: int = 20) -> dict[str, Any]:
    """Accuracy + FLOPs + throughput of a checkpoint (optionally with a reduction method attached)."""
    from ..analysis.flops import count_flops
    from ..data import build_data
    from ..models.checkpoint import read_checkpoint
    from .benchmark import measure_throughput
    from .distributed import init_distributed

    dist_info = init_distributed(cfg.device)
    device = dist_info.device
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path else None
    in_chans, size = resolve_input(cfg)
    opts = cfg.data_options(in_chans)
    opts.input_size = size
    data = build_data(opts, device, dist_info.rank, dist_info.world_size, with_train=False)
    num_classes = cfg.num_classes or data.num_classes
    model = build_evaluated_model(cfg, checkpoint, num_classes, in_chans, data.input_size, use_ema).to(device)
    dtype = cfg.amp_dtype if cfg.amp and device.type == "cuda" else "fp32"
    result: dict[str, Any] = {"model": cfg.model, "method": cfg.method, "method_opts": cfg.method_opts,
                              "checkpoint": checkpoint_path, "use_ema": use_ema, "img_size": data.input_size}
    result.update(evaluate(model, data.val, device, dtype, progress=dist_info.is_main and cfg.progress))
    flops = count_flops(model, data.input_size)
    result.update(gflops=flops.gflops("paper"), gflops_full=flops.gflops("full"),
                  params=sum(p.numel() for p in model.parameters()))
    if throughput and dist_info.is_main:
        bench = measure_throughput(model, bench_batch, data.input_size, device, dtype,
                                   warmup=3, iters=bench_iters)
        result.update(img_per_s=bench["img_per_s"], bench=bench)
    return result
