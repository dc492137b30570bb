"""Batches for the training loop: a streaming DataLoader (timm DeiT transforms) or an in-memory fast path.

Both yield ``(images, labels)`` already on the device, normalised, and both can skip the first ``k`` samples of
an epoch so a run resumed mid-epoch sees exactly the batches the uninterrupted run would have seen. Sample
order depends only on (seed, epoch): a :class:`torch.utils.data.DistributedSampler` or timm's
``RepeatAugSampler`` (repeated augmentation), wrapped by :class:`ResumableSampler`.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .datasets import (ClassFolderDataset, DataError, TensorImageDataset, ZipClassFolderDataset, decode_to_tensors,
                       digits_dataset, resolve_split_name)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS = "digits"
SYNTHETIC = "synthetic"
MOVING_SHAPES = "moving-shapes"  # the bundled video set (data/video_synth.py)
TASKS = ("image", "video")


@dataclass
class DataOptions:
    """What the data side needs from a training config (field names match :class:`TrainConfig`)."""

    data_path: str = DIGITS
    data_mode: str = "auto"          # auto | memory | stream
    input_size: int | None = None    # None: the data's native size (digits: 16)
    in_chans: int = 3
    batch_size: int = 64             # per process
    eval_batch_size: int | None = None
    num_workers: int = 4
    # DeiT augmentation (streaming path)
    aa: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    train_interpolation: str = "bicubic"
    crop_pct: float = 0.875
    repeated_aug: int = 1            # >1: timm RepeatAugSampler with that many repeats
    # in-memory path (device-side augmentation)
    gpu_aug_pad: int = 4
    gpu_aug_flip: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    seed: int = 0
    # video (task 'video', data/video.py): TSN-sampled clips; evaluation averages test_clips x test_crops views
    task: str = "image"              # image | video
    num_frames: int = 8
    test_clips: int = 1
    test_crops: int = 1
    video_flip: bool = True          # off where the motion direction is the label (the bundled moving shapes)
    video_min_scale: float = 0.08    # RandomResizedCrop area range (video_min_scale, 1)


class ResumableSampler(Sampler[int]):
    """Wraps an epoch-seeded sampler; ``set_epoch(epoch, skip)`` drops the first ``skip`` samples of the epoch."""

    def __init__(self, base: Any) -> None:
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        for i, index in enumerate(self.base):
            if i >= self.skip:
                yield index

    def __len__(self) -> int:
        return len(self.base)  # full epoch length (the loop counts batches itself)


class ShardSampler(Sampler[int]):
    """Evaluation: every sample exactly once over all ranks (no padding, so summed counts are exact)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_sampler(dataset: Dataset, rank: int, world_size: int, seed: int, repeats: int) -> ResumableSampler:
    if repeats > 1:
        from timm.data.distributed_sampler import RepeatAugSampler

        base: Any = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, num_repeats=repeats)
        base.seed = seed  # not a constructor argument in every timm version; read in __iter__ when present
    else:
        base = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                  drop_last=True)
    return ResumableSampler(base)


class DeviceTensorLoader:
    """In-memory batches: uint8 images live on the device; crop-with-padding + flip happen there, batched."""

    def __init__(self, dataset: TensorImageDataset, sampler: Sampler[int], batch_size: int, device: torch.device,
                 mean: tuple[float, ...], std: tuple[float, ...], train: bool, pad: int = 0,
                 flip: bool = False) -> None:
        self.images = dataset.images.to(device)
        self.targets = dataset.targets.to(device)
        self.sampler, self.batch_size, self.train = sampler, batch_size, train
        self.pad, self.flip, self.device = pad, flip, device
        chans = self.images.shape[1]
        self.mean = torch.tensor(_per_channel(mean, chans), device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(_per_channel(std, chans), device=device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield self._make(batch)
                batch = []
        if batch and not self.train:
            yield self._make(batch)

    def _make(self, batch: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.tensor(batch, device=self.device)
        x = self.images[index].float()
        if self.train and self.pad > 0:
            x = random_crop_with_padding(x, self.pad)
        if self.train and self.flip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return (x - self.mean) / self.std, self.targets[index]


def random_crop_with_padding(x: Tensor, pad: int) -> Tensor:
    """Per-sample random crop of the zero-padded batch back to its size (CIFAR-style), on x's device."""
    bsz, _, height, width = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (bsz,), device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (bsz,), device=x.device)
    rows = (oy[:, None] + torch.arange(height, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(width, device=x.device))[:, None, None, :]
    batch = torch.arange(bsz, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


class StreamingLoader:
    """A DataLoader whose batches are moved to the device; worker seeds come from (seed, epoch) only."""

    #: how worker processes start (None: the platform's default, fork on Linux)
    worker_start: str | None = None

    def __init__(self, dataset: Dataset, sampler: Sampler[int], batch_size: int, device: torch.device,
                 num_workers: int, train: bool, seed: int, collate_fn: Any = None) -> None:
        self.sampler, self.device, self.seed, self.epoch = sampler, device, seed, 0
        self.generator = torch.Generator()
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                 drop_last=train, pin_memory=device.type == "cuda", generator=self.generator,
                                 persistent_workers=False, collate_fn=collate_fn,
                                 multiprocessing_context=self.worker_start if num_workers > 0 else None)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.set_epoch(epoch, skip)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.generator.manual_seed(self.seed * 100003 + self.epoch)
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class _DeviceLoaderWithEpoch(DeviceTensorLoader):
    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.set_epoch(epoch, skip)


@dataclass
class DataBundle:
    train: Any              # StreamingLoader | DeviceTensorLoader (has set_epoch, __len__, __iter__)
    val: Any
    num_classes: int
    classes: list[str]
    input_size: int
    in_chans: int
    mode: str               # 'memory' | 'stream'
    train_size: int
    val_size: int


def synthetic_dataset(spec: str, size: int, chans: int) -> tuple[TensorImageDataset, TensorImageDataset]:
    """``synthetic[:N[:CLASSES]]``: N random images (seed 0) with random labels, for throughput/scaling runs;
    the evaluation split is the first quarter of them."""
    parts = spec.split(":")
    try:
        count = int(parts[1]) if len(parts) > 1 else 4096
        classes = int(parts[2]) if len(parts) > 2 else 10
    except ValueError as err:
        raise DataError(f"synthetic data is written synthetic[:N[:CLASSES]], got {spec!r}") from err
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, chans, size, size), dtype=torch.uint8, generator=gen)
    targets = torch.randint(0, classes, (count,), generator=gen)
    names = [str(i) for i in range(classes)]
    cut = max(1, count // 4)
    return TensorImageDataset(images, targets, names), TensorImageDataset(images[:cut], targets[:cut], names)


def _per_channel(values: tuple[float, ...], chans: int) -> list[float]:
    values = list(values)
    if len(values) == chans:
        return values
    if chans == 1:
        return [sum(values) / len(values)]
    if len(values) == 1:
        return values * chans
    raise DataError(f"{len(values)} normalisation values for {chans}-channel images")


def _folder_datasets(path: Path, mode: str) -> tuple[Dataset, Dataset]:
    """(train, val) datasets of a folder or zip, with clear errors for a missing path or wrong layout."""
    image_mode = "L" if mode == "L" else "RGB"
    if not path.exists():
        raise DataError(f"data path {path} does not exist (give a folder or a .zip holding train/ and val/ or test/ "
                        f"class folders, or 'digits' for the bundled data)")
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise DataError(f"data path {path} is a file but not a .zip")
        return (ZipClassFolderDataset(path, "train", mode=image_mode),
                ZipClassFolderDataset(path, "val", mode=image_mode))
    subdirs = [p.name for p in path.iterdir() if p.is_dir()]
    files = [p.name for p in path.iterdir() if p.is_file()]
    train = resolve_split_name(subdirs, "train", f"data folder {path}", files)
    val = resolve_split_name(subdirs, "val", f"data folder {path}", files)
    return ClassFolderDataset(path / train, mode=image_mode), ClassFolderDataset(path / val, mode=image_mode)


def check_one_global_batch(num_train: int, opts: DataOptions, world_size: int) -> None:
    """Training drops incomplete batches: fewer images than one global batch would train on nothing."""
    if num_train < opts.batch_size * world_size:
        raise DataError(f"{num_train} training images are fewer than one global batch "
                        f"({opts.batch_size} x {world_size} processes)")


def build_image_data(opts: DataOptions, device: torch.device, rank: int = 0, world_size: int = 1,
                     with_train: bool = True) -> DataBundle:
    """Datasets + batch sources for training and (sharded) evaluation (``with_train=False``: evaluation only,
    ``bundle.train`` is None)."""
    eval_bs = opts.eval_batch_size or opts.batch_size
    if opts.data_path.startswith(SYNTHETIC):
        size = opts.input_size or 32
        train_t, val_t = synthetic_dataset(opts.data_path, size, opts.in_chans)
        mode = "memory"
    elif opts.data_path == DIGITS:
        size = opts.input_size or 16
        train_t = digits_dataset("train", size, opts.in_chans)
        val_t = digits_dataset("val", size, opts.in_chans)
        mode = "memory"
    else:
        train_ds, val_ds = _folder_datasets(Path(opts.data_path).expanduser(), "L" if opts.in_chans == 1 else "RGB")
        if set(train_ds.classes) != set(val_ds.classes):  # type: ignore[attr-defined]
            missing = sorted(set(train_ds.classes) ^ set(val_ds.classes))  # type: ignore[attr-defined]
            raise DataError(f"train and evaluation splits have different class folders (e.g. {missing[:3]})")
        mode = opts.data_mode
        if mode == "auto":
            small = len(train_ds) <= 200_000 and (opts.input_size or 0) <= 64  # type: ignore[arg-type]
            mode = "memory" if small and opts.input_size else "stream"
        if mode == "memory":
            train_t = (decode_to_tensors(train_ds, opts.input_size, opts.num_workers)  # type: ignore[arg-type]
                       if with_train
                       else TensorImageDataset(torch.zeros(0, opts.in_chans, 1, 1, dtype=torch.uint8),
                                               torch.zeros(0), list(train_ds.classes)))  # type: ignore[attr-defined]
            val_t = decode_to_tensors(val_ds, opts.input_size, opts.num_workers)  # type: ignore[arg-type]
        elif mode != "stream":
            raise DataError(f"unknown data mode {mode!r} (auto, memory, stream)")
    if mode == "memory":
        size = val_t.images.shape[-1]
        if with_train:
            check_one_global_batch(len(train_t), opts, world_size)
        train = None
        if with_train:
            sampler = train_sampler(train_t, rank, world_size, opts.seed, opts.repeated_aug)
            train = _DeviceLoaderWithEpoch(train_t, sampler, opts.batch_size, device, opts.mean, opts.std, True,
                                           opts.gpu_aug_pad, opts.gpu_aug_flip)
        val = _DeviceLoaderWithEpoch(val_t, ShardSampler(len(val_t), rank, world_size), eval_bs, device,
                                     opts.mean, opts.std, False)
        return DataBundle(train, val, len(train_t.classes), train_t.classes, size, val_t.images.shape[1],
                          "memory", len(train_t), len(val_t))

    from timm.data import create_transform

    size = opts.input_size or 224
    mean, std = tuple(_per_channel(opts.mean, opts.in_chans)), tuple(_per_channel(opts.std, opts.in_chans))
    train_ds.transform = create_transform(  # type: ignore[attr-defined]
        size, is_training=True, auto_augment=opts.aa, color_jitter=opts.color_jitter,
        interpolation=opts.train_interpolation, re_prob=opts.reprob, re_mode=opts.remode, re_count=opts.recount,
        mean=mean, std=std)
    val_ds.transform = create_transform(  # type: ignore[attr-defined]
        size, is_training=False, interpolation="bicubic", crop_pct=opts.crop_pct, mean=mean, std=std)
    if with_train:
        check_one_global_batch(len(train_ds), opts, world_size)
    train = None
    if with_train:
        sampler = train_sampler(train_ds, rank, world_size, opts.seed, opts.repeated_aug)
        train = StreamingLoader(train_ds, sampler, opts.batch_size, device, opts.num_workers, True, opts.seed)
    val = StreamingLoader(val_ds, ShardSampler(len(val_ds), rank, world_size), eval_bs, device, opts.num_workers,
                          False, opts.seed)
    return DataBundle(train, val, len(train_ds.classes), list(train_ds.classes), size,  # type: ignore[attr-defined]
                      opts.in_chans, "stream", len(train_ds), len(val_ds))
