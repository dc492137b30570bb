"""The one data entry point: batches for the config's task, images (``loaders.py``) or video clips
(``video.py``)."""
from __future__ import annotations

import torch

from .datasets import DataError
from .loaders import TASKS, DataBundle, DataOptions, build_image_data


def build_data(opts: DataOptions, device: torch.device, rank: int = 0, world_size: int = 1,
               with_train: bool = True) -> DataBundle:
    """Datasets + batch sources for training and (sharded) evaluation (``with_train=False``: evaluation only,
    ``bundle.train`` is None)."""
    if opts.task not in TASKS:
        raise DataError(f"unknown task {opts.task!r} (valid: {', '.join(TASKS)})")
    if opts.task == "video":
        from .video_loader import build_video_data

        return build_video_data(opts, device, rank, world_size, with_train)
    return build_image_data(opts, device, rank, world_size, with_train)
