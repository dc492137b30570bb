"""Semantic-segmentation training and evaluation on the shared engine pieces (AMP, DDP, atomic checkpoints,
exact RNG state on resume), after the authors' UperNet recipe: AdamW with layer-wise lr decay, a poly schedule
with linear warm-up by iteration, gradient clipping, slide inference (single scale, optional flip).

``train_segmentation(cfg)`` runs a whole job from a :class:`SegConfig` (``mambatrim train --task
segmentation``); ``evaluate_segmentation(model, dataset, ...)`` gives mIoU / per-class IoU / pixel accuracy.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.scheduler import PolyLRScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .._yaml import load_yaml_text
from ..data.segmentation import BUNDLED_CLASSES, IGNORE_INDEX, bundled_root, segmentation_datasets
from ..models.checkpoint import load_checkpoint, read_checkpoint
from ..models.segmentation import AUX_LOGITS, SegmentationModel, create_segmentation_model
from .checkpointing import atomic_save, capture_rng_state, restore_rng_state
from .distributed import DistInfo, barrier, cleanup, init_distributed
from .precision import autocast, canonical_dtype
from .report import write_json
from .seg_metrics import ConfusionMatrix


@dataclass
class SegConfig:
    """One segmentation run (YAML keys = field names)."""

    task: str = "segmentation"  # marks a recipe as a segmentation one (configs/seg_*.yaml)
    backbone: str = "vim_tiny_patch16_224"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # backbone config overrides (depth, ...)
    num_classes: int | None = None  # None: 150 for a folder, the bundled set's classes otherwise
    out_indices: list[int] = field(default_factory=lambda: [5, 11, 17, 23])
    head_channels: int | None = None  # None: the backbone's width (192 for Vim-T, 384 for Vim-S)
    aux_weight: float = 0.4  # the auxiliary FCN head's loss weight (0: no auxiliary head)
    class_token: bool = False  # the authors' segmentation backbones have none
    drop_path: float = 0.1
    method: str | None = None
    method_opts: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None  # backbone (classification) checkpoint, pos_embed resized
    finetune: str | None = None  # segmentation checkpoint to start from (dense weights before the method)
    data_path: str | None = None  # ADE20K-layout folder; None: the bundled generated set
    bundled_size: int = 128
    crop: int = 512
    scale: list[int] = field(default_factory=lambda: [2048, 512])
    cat_max_ratio: float = 0.75
    batch_size: int = 8  # per process
    num_workers: int = 4
    iters: int = 80000
    lr: float = 6e-5
    weight_decay: float = 0.01
    layer_decay: float = 0.92
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    clip_grad: float | None = 5.0
    dtype: str = "bf16"  # autocast on CUDA; fp32 on CPU
    eval_interval: int = 8000
    slide_stride: int = 341
    flip: bool = False
    seed: int = 0
    device: str = "auto"
    output_dir: str | None = None
    log_interval: int = 50

    def __post_init__(self) -> None:
        if self.task != "segmentation":
            raise ValueError(f"a segmentation config has task 'segmentation', got {self.task!r}")
        self.dtype = canonical_dtype(self.dtype, "dtype")
        for name in ("iters", "batch_size", "crop", "slide_stride", "eval_interval"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {self.layer_decay}")


def load_seg_config(path: str | None, overrides: dict[str, Any] | None = None) -> SegConfig:
    """Defaults < YAML ``path`` < ``overrides``; an unknown key is a one-line error naming the valid ones."""
    values: dict[str, Any] = {}
    if path:
        values.update(load_yaml_text(Path(path).read_text()) or {})
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(SegConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown segmentation config keys {unknown}; valid keys: {', '.join(sorted(known))}")
    return SegConfig(**values)


# ---------------------------------------------------------------------------------------------- model
def build_segmenter(cfg: SegConfig, num_classes: int, state: dict[str, Tensor] | None = None) -> SegmentationModel:
    """The segmenter of a config: backbone weights (``pretrained``), the method on the backbone, and a
    segmentation ``state`` dict (``finetune`` when not given): a dense one is loaded before the method is
    attached (a method starts from dense weights), one holding method parameters after it."""
    kwargs = {"drop_path_rate": cfg.drop_path, **cfg.model_kwargs}
    model = create_segmentation_model(cfg.backbone, num_classes, cfg.crop, tuple(cfg.out_indices),
                                      cfg.head_channels, cfg.class_token, aux_channels=256 if cfg.aux_weight else 0,
                                      **kwargs)
    if cfg.pretrained:
        load_checkpoint(model.backbone, read_checkpoint(cfg.pretrained), skip_mismatched_head=True)
    if state is None and cfg.finetune:
        state = read_checkpoint(cfg.finetune)["model"]
    has_method = state is not None and any(".reducer." in key for key in state)
    if state is not None and not has_method:
        model.load_state_dict(state)
    if cfg.method:
        from ..reduce import apply_method  # noqa: PLC0415 (engine may import reduce)

        apply_method(model.backbone, cfg.method, **cfg.method_opts)
    if has_method:
        model.load_state_dict(state)
    return model


def layer_decay_groups(model: SegmentationModel, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """AdamW groups with mmseg's layer-wise lr decay for ViT-like backbones: embeddings are layer 0, block i
    is i + 1, everything else (neck, head, method parameters) the top; 1-d weights, biases and
    ``no_weight_decay`` names are not decayed."""
    depth = int(model.backbone.depth)
    top = depth + 1
    skip = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = top
        if name.startswith("backbone.layers."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("backbone.patch_embed", "backbone.pos_embed", "backbone.cls_token")):
            layer = 0
        exempt = param.ndim <= 1 or name.endswith(".bias") or name in skip
        group = groups.setdefault((layer, exempt), {"params": [], "weight_decay": 0.0 if exempt else weight_decay,
                                                    "lr": lr * decay ** (top - layer)})
        group["params"].append(param)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def slide_logits(model: nn.Module, image: Tensor, num_classes: int, crop: int, stride: int) -> Tensor:
    """mmseg's slide inference: ``crop`` windows every ``stride`` pixels (the last one flush with the border),
    logits summed and divided by each pixel's window count. Windows smaller than ``crop`` are zero-padded."""
    bsz, _, height, width = image.shape
    logits = image.new_zeros(bsz, num_classes, height, width)
    count = image.new_zeros(1, 1, height, width)
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            window = image[:, :, y1:y2, x1:x2]
            h, w = window.shape[2:]
            out = model(F.pad(window, (0, crop - w, 0, crop - h)))[:, :, :h, :w]
            logits[:, :, y1:y2, x1:x2] += out.float()
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def predict(model: nn.Module, image: Tensor, num_classes: int, crop: int, stride: int, flip: bool,
            size: Sequence[int]) -> Tensor:
    """Class probabilities (B, C, *size): slide inference, optionally averaged with the flipped image."""
    probs = slide_logits(model, image, num_classes, crop, stride).softmax(1)
    if flip:
        flipped = slide_logits(model, image.flip(-1), num_classes, crop, stride).softmax(1).flip(-1)
        probs = (probs + flipped) / 2
    return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)


def evaluate_segmentation(model: nn.Module, dataset: Dataset, num_classes: int, device: torch.device,
                          crop: int, stride: int, flip: bool = False, dtype: str = "fp32",
                          dist_info: DistInfo | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy over ``dataset`` (one image at a time, sharded over processes,
    the confusion matrix summed over them)."""
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    meter = ConfusionMatrix(num_classes, device)
    was_training = model.training
    model.eval()
    with autocast(device, dtype):
        for index in range(rank, len(dataset), world):
            image, label = dataset[index]
            label = label.to(device)[None]
            probs = predict(model, image.to(device)[None], num_classes, crop, stride, flip, label.shape[1:])
            meter.update(probs.argmax(1), label)
    model.train(was_training)
    meter.all_reduce()
    return meter.compute()


# ---------------------------------------------------------------------------------------------- training
def _batches(loader: DataLoader, sampler: DistributedSampler | None, seed: int,
             epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless batches, reshuffled per pass by (seed, pass)."""
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        else:
            loader.generator.manual_seed(seed * 100003 + epoch)  # type: ignore[union-attr]
        yield from loader
        epoch += 1


def train_segmentation(cfg: SegConfig, resume: str | None = None) -> dict[str, Any]:
    """Train ``cfg.iters`` iterations, evaluate every ``eval_interval`` and at the end; ``resume``: a
    ``last.pth`` (or 'auto': the output folder's) to continue from, with its weights, optimizer, schedule and
    every rank's RNG state (the data order restarts the current pass over the training set). Returns the
    summary (also summary.json)."""
    dist_info = init_distributed(cfg.device)
    try:
        return _train(cfg, dist_info, resume)
    finally:
        cleanup()


def _train(cfg: SegConfig, dist_info: DistInfo, resume: str | None) -> dict[str, Any]:
    device = dist_info.device
    torch.manual_seed(cfg.seed + dist_info.rank)
    data, num_classes = _data(cfg)
    model = build_segmenter(cfg, num_classes).to(device)
    if dist_info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr)
    scheduler = PolyLRScheduler(optimizer, t_initial=cfg.iters, power=1.0, lr_min=0.0, warmup_t=cfg.warmup_iters,
                                warmup_lr_init=cfg.lr * cfg.warmup_ratio, t_in_epochs=False)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.dtype == "fp16")
    out = Path(cfg.output_dir) if cfg.output_dir else None
    start = 0
    ckpt_path = _resume_path(out, resume)
    if ckpt_path is not None:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["iteration"])
        restore_rng_state(ckpt["rng"][min(dist_info.rank, len(ckpt["rng"]) - 1)])
        scheduler.step_update(start)
    forward = model
    if dist_info.enabled:
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None, find_unused_parameters=True)
    sampler = DistributedSampler(data["train"], seed=cfg.seed) if dist_info.enabled else None
    generator = None if sampler else torch.Generator()
    loader = DataLoader(data["train"], batch_size=cfg.batch_size, sampler=sampler, shuffle=sampler is None,
                        generator=generator, num_workers=cfg.num_workers, drop_last=True,
                        persistent_workers=cfg.num_workers > 0)
    epoch = start * cfg.batch_size * dist_info.world_size // max(len(data["train"]), 1)
    batches = _batches(loader, sampler, cfg.seed, epoch)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    log: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    began = time.time()
    model.train()
    for it in range(start, cfg.iters):
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, cfg.dtype):
            logits, state = _forward_with_state(forward, model, images)
            losses = {"ce": criterion(logits.float(), labels)}
            if AUX_LOGITS in state.extras:
                losses["aux_ce"] = cfg.aux_weight * criterion(state.extras[AUX_LOGITS].float(), labels)
            reducer = model.backbone.reducer
            if reducer is not None:
                losses.update(reducer.extra_losses(state))
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_update(it + 1)
        if dist_info.is_main and ((it + 1) % cfg.log_interval == 0 or it + 1 == cfg.iters):
            log.append({"iter": it + 1, **{k: float(v.detach()) for k, v in losses.items()},
                        "lr": optimizer.param_groups[-1]["lr"]})
        if (it + 1) % cfg.eval_interval == 0 or it + 1 == cfg.iters:
            metrics = evaluate_segmentation(model, data["val"], num_classes, device, cfg.crop, cfg.slide_stride,
                                            cfg.flip, cfg.dtype, dist_info)
            evals.append({"iter": it + 1, "mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"]})
            _save(out, dist_info, model, optimizer, scaler, cfg, it + 1)
    summary = {"config": dataclasses.asdict(cfg), "num_classes": num_classes, "train_log": log, "evals": evals,
               "final": evals[-1] if evals else None, "wall_s": time.time() - began, "data": str(data["root"])}
    if out is not None and dist_info.is_main:
        write_json(out / "summary.json", summary)
    return summary


def _resume_path(out: Path | None, resume: str | None) -> Path | None:
    """The checkpoint to continue from: ``resume`` ('auto': OUTPUT_DIR/last.pth if present). A run already in
    the output folder is never silently overwritten."""
    if resume == "auto":
        return out / "last.pth" if out is not None and (out / "last.pth").exists() else None
    if resume:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        return Path(resume)
    if out is not None and (out / "last.pth").exists():
        raise ValueError(f"{out} already holds a run (last.pth): continue it with --resume auto or choose another "
                         "--output-dir")
    return None


def _data(cfg: SegConfig) -> tuple[dict[str, Any], int]:
    """The config's datasets (the bundled set when no ``data_path``) and class count (150 for a folder)."""
    root = bundled_root(cfg.bundled_size) if cfg.data_path is None else cfg.data_path
    data = segmentation_datasets(root, cfg.crop, tuple(cfg.scale), cfg.cat_max_ratio)
    return data, cfg.num_classes or (len(BUNDLED_CLASSES) if cfg.data_path is None else 150)


def _forward_with_state(forward: nn.Module, model: SegmentationModel, images: Tensor) -> tuple[Tensor, Any]:
    """Logits and the backbone's final state, through the DDP wrapper when there is one."""
    if forward is model:
        return model.forward_with_state(images)
    logits = forward(images)
    return logits, model.last_state


def _save(out: Path | None, dist_info: DistInfo, model: nn.Module, optimizer: Any, scaler: Any, cfg: SegConfig,
          iteration: int) -> None:
    from .distributed import all_gather_objects  # noqa: PLC0415

    rng = all_gather_objects(capture_rng_state())
    if out is not None and dist_info.is_main:
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "iteration": iteration, "rng": rng,
                     "config": dataclasses.asdict(cfg), "task": "segmentation"}, out / "last.pth")
    barrier()


# ---------------------------------------------------------------------------------------------- evaluation job
def segmentation_flops(model: SegmentationModel, images: Tensor) -> dict[str, float]:
    """GFLOPs (MACs, the papers' convention) per image: the backbone by the analytical counter (what ran,
    method included), the neck and head by PyTorch's operator counter on the restored maps."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..analysis.flops import count_flops  # noqa: PLC0415

    backbone = count_flops(model.backbone, images=images).total() / images.shape[0]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        maps, _ = model.forward_backbone(images[:1])
        with FlopCounterMode(display=False) as counter:
            model.forward_head(maps, images.shape[2:])
    model.train(was_training)
    head = counter.get_total_flops() / 2  # multiply-adds
    return {"backbone_gflops": backbone / 1e9, "head_gflops": head / 1e9, "gflops": (backbone + head) / 1e9}


def evaluate_checkpoint(cfg: SegConfig, checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """mIoU / pixel accuracy / FLOPs of a segmentation checkpoint (``None``: a fresh model), with ``cfg.method``
    attached: a dense checkpoint is loaded before the method (training-free use), one holding method
    parameters after it."""
    dist_info = init_distributed(cfg.device)
    try:
        data, num_classes = _data(cfg)
        model = build_segmenter(cfg, num_classes, (checkpoint or {}).get("model"))
        model.to(dist_info.device).eval()
        metrics = evaluate_segmentation(model, data["val"], num_classes, dist_info.device, cfg.crop,
                                        cfg.slide_stride, cfg.flip, cfg.dtype, dist_info)
        images = torch.stack([data["val"][i][0] for i in range(min(4, len(data["val"])))]).to(dist_info.device)
        crops = F.interpolate(images, size=(cfg.crop, cfg.crop), mode="bilinear", align_corners=False)
        return {**metrics, **segmentation_flops(model, crops), "method": cfg.method, "method_opts": cfg.method_opts,
                "backbone": cfg.backbone, "crop": cfg.crop, "num_classes": num_classes}
    finally:
        cleanup()
