"""Batches of video clips for the training loop: the image path's samplers (seeded, resumable, sharded) with
decoding in DataLoader workers, pinned memory, and a count of the unreadable files every pass skipped."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .loaders import (MOVING_SHAPES, DataBundle, DataOptions, ShardSampler, StreamingLoader, _per_channel,
                      check_one_global_batch, train_sampler)
from .video import ClipOptions, UnreadableVideoWarning, VideoDataset, collate_clips, video_splits


class VideoLoader(StreamingLoader):
    """A :class:`StreamingLoader` over :class:`VideoDataset`: ``skipped`` counts the unreadable files met in the
    current pass (every worker's), and each batch that met one logs the running count."""

    skipped = 0
    # workers start from a fresh server process, not forked from this one: once this process has decoded a video,
    # FFmpeg / PyAV may hold locks that a forked worker then waits on forever (seen as a hung DataLoader)
    worker_start = "forkserver"

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.generator.manual_seed(self.seed * 100003 + self.epoch)
        self.skipped = 0
        for x, y, failed in self.loader:
            if failed:
                self.skipped += int(failed)
                warnings.warn(f"{self.skipped} unreadable video file(s) skipped so far in this pass",
                              UnreadableVideoWarning, stacklevel=2)
            if x is None:
                continue
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def clip_options(opts: DataOptions, size: int) -> ClipOptions:
    """The clip settings of a data config (3-channel video: the normalisation is per RGB channel)."""
    return ClipOptions(num_frames=opts.num_frames, size=size, clips=opts.test_clips, crops=opts.test_crops,
                       flip=opts.video_flip, min_scale=opts.video_min_scale, mean=tuple(_per_channel(opts.mean, 3)),
                       std=tuple(_per_channel(opts.std, 3)))


def video_root(data_path: str) -> tuple[Path, int]:
    """(folder, default input size): 'moving-shapes' is the bundled set (made on first use, then cached)."""
    if data_path.split(":")[0] == MOVING_SHAPES:
        from .video_synth import moving_shapes

        return moving_shapes(), 32
    return Path(data_path).expanduser(), 224


def build_video_data(opts: DataOptions, device: torch.device, rank: int = 0, world_size: int = 1,
                     with_train: bool = True) -> DataBundle:
    """Clip loaders for training (TSN sampling, clip-consistent crop + flip) and sharded multi-view evaluation."""
    root, native = video_root(opts.data_path)
    train_samples, val_samples, classes = video_splits(root)
    size = opts.input_size or native
    clip = clip_options(opts, size)
    views = opts.test_clips * opts.test_crops
    eval_bs = max(1, (opts.eval_batch_size or opts.batch_size) // views)  # views share a forward pass
    val_ds = VideoDataset(val_samples, classes, clip, train=False)
    val = VideoLoader(val_ds, ShardSampler(len(val_ds), rank, world_size), eval_bs, device, opts.num_workers,
                      False, opts.seed, collate_fn=collate_clips)
    train = None
    if with_train:
        check_one_global_batch(len(train_samples), opts, world_size)
        train_ds = VideoDataset(train_samples, classes, clip, train=True)
        train = VideoLoader(train_ds, train_sampler(train_ds, rank, world_size, opts.seed, opts.repeated_aug),
                            opts.batch_size, device, opts.num_workers, True, opts.seed, collate_fn=collate_clips)
    return DataBundle(train, val, len(classes), classes, size, 3, "stream", len(train_samples), len(val_samples))
