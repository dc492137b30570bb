"""Video data: Kinetics-style folders decoded with PyAV, TSN segment sampling, clip-consistent augmentation,
multi-clip x multi-crop evaluation views, and unreadable files skipped and counted instead of killing an epoch.

Layouts (``root`` is a folder):

- ``root/train.csv`` and ``root/val.csv`` (or ``test.csv``): one ``path label`` line per video (comma or
  whitespace separated, as the official VideoMamba lists), paths relative to ``root`` or absolute; optional
  ``root/classes.txt`` with one class name per line.
- ``root/train/CLASS/*.mp4`` and ``root/val/CLASS/*.mp4``: class sub-folders.

A training sample is ``(C, T, H, W)`` float, normalised; an evaluation sample is ``(V, C, T, H, W)`` with
``V = clips x crops`` views (squeezed to ``(C, T, H, W)`` when ``V == 1``), whose logits the evaluation averages.

Bad files. Training retries with the next index (the batch keeps its size, so CUDA graphs, DDP and mixup see
fixed shapes); evaluation drops the sample (no video is counted twice). Either way a warning names the file,
and :class:`VideoLoader` counts the skips of every pass (workers included) and reports the total.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .datasets import DataError, resolve_split_name

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
MAX_RETRIES = 16


class UnreadableVideoWarning(UserWarning):
    """A video that could not be decoded was skipped."""


def require_av() -> Any:
    """PyAV, or a one-line DataError saying how to install it."""
    try:
        import av
    except ImportError as err:
        raise DataError("video data needs PyAV: pip install 'mambatrim[video]' (or pip install av)") from err
    return av


# ----------------------------------------------------------------------------------------------- sampling
def segment_bounds(total: int, num_frames: int, segment: int) -> tuple[int, int]:
    """First and last frame (inclusive) of TSN segment ``segment`` when ``total`` frames are cut into
    ``num_frames`` equal segments (a segment shorter than one frame holds the frame it starts in). Integer
    arithmetic: ``floor(segment * total / num_frames)`` exactly, with no float rounding at the boundaries."""
    first = segment * total // num_frames
    return first, max(first, (segment + 1) * total // num_frames - 1)


def train_indices(total: int, num_frames: int, generator: torch.Generator | None = None) -> list[int]:
    """TSN training sampling: one frame drawn uniformly from each of ``num_frames`` equal segments."""
    out = []
    for seg in range(num_frames):
        first, last = segment_bounds(total, num_frames, seg)
        out.append(first + int(torch.randint(last - first + 1, (1,), generator=generator)))
    return out


def eval_indices(total: int, num_frames: int, clips: int) -> list[list[int]]:
    """Multi-clip evaluation: clip ``k`` of ``clips`` takes the frame at fraction ``(k + 0.5) / clips`` of every
    segment, so the clips tile the video evenly: ``floor((seg + (k + 1/2) / clips) * total / num_frames)``."""
    scale = 2 * num_frames * clips
    return [[(2 * clips * seg + 2 * k + 1) * total // scale for seg in range(num_frames)] for k in range(clips)]


# ---------------------------------------------------------------------------------------------- decoding
def _decode(path: str | Path, pick: Callable[[int], Sequence[int]] | None) -> tuple[dict[int, Any], int, list[int]]:
    """One pass over the first video stream: ``pick(header frame count)`` chooses the frames to keep (all, when
    ``pick`` is None or the header has no count); decoding stops after the last one. Returns (RGB arrays by
    index, frames decoded, picked indices)."""
    av = require_av()
    frames: dict[int, Any] = {}
    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        indices = list(pick(int(stream.frames))) if pick is not None and stream.frames > 0 else []
        keep, stop = set(indices), max(indices) if indices else None
        for i, frame in enumerate(container.decode(stream)):
            count = i + 1
            if stop is None or i in keep:
                frames[i] = frame.to_ndarray(format="rgb24")
            if stop is not None and i >= stop:
                break
    return frames, count, indices


def read_frames(path: str | Path, pick: Callable[[int], Sequence[int]]) -> tuple[Tensor, list[int]]:
    """Decode the frames ``pick(total)`` chooses: ``(uint8 (N, C, H, W) of the distinct picked frames, the row
    of each picked index)``. A header without a frame count, or one overstating it, costs a second pass that
    keeps every frame and picks again from the true count."""
    import numpy as np

    frames, count, indices = _decode(path, pick)
    if not indices or any(i not in frames for i in indices):
        frames, count, _ = _decode(path, None)
        if count == 0:
            raise DataError(f"{path} holds no decodable video frames")
        indices = list(pick(count))
    order = sorted(set(indices))
    row = {i: n for n, i in enumerate(order)}
    return torch.from_numpy(np.stack([frames[i] for i in order])).permute(0, 3, 1, 2), [row[i] for i in indices]


# --------------------------------------------------------------------------------------------- transforms
@dataclass
class ClipOptions:
    """How clips are sampled and shaped."""

    num_frames: int = 8
    size: int = 224
    clips: int = 1                          # evaluation: temporal clips per video
    crops: int = 1                          # evaluation: spatial crops per clip
    flip: bool = True                       # training: horizontal flip (off where motion direction is the label)
    min_scale: float = 0.08                 # training: RandomResizedCrop area range (min_scale, 1)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


class ClipTransform:
    """uint8 frames (T, C, H, W) -> normalised float (C, T, H, W).

    Training: one RandomResizedCrop + flip for the whole clip (torchvision v2 draws the parameters once for a
    Video). Evaluation: the short side resized to ``size``, then ``crops`` crops spread evenly along the long
    side (3: start, centre, end; 1: centre).
    """

    def __init__(self, opts: ClipOptions, train: bool) -> None:
        from torchvision.transforms import v2

        self.opts, self.train = opts, train
        steps: list[Any] = [v2.RandomResizedCrop(opts.size, scale=(opts.min_scale, 1.0), antialias=True)]
        if opts.flip:
            steps.append(v2.RandomHorizontalFlip())
        self.augment = v2.Compose(steps)
        self.mean = torch.tensor(opts.mean).view(-1, 1, 1, 1)
        self.std = torch.tensor(opts.std).view(-1, 1, 1, 1)

    def normalise(self, frames: Tensor) -> Tensor:
        return (frames.permute(1, 0, 2, 3).float() / 255 - self.mean) / self.std

    def __call__(self, frames: Tensor) -> Tensor:
        from torchvision import tv_tensors

        return self.normalise(self.augment(tv_tensors.Video(frames)).as_subclass(Tensor))

    def crops(self, frames: Tensor) -> list[Tensor]:
        """The evaluation crops of one clip, each (C, T, size, size)."""
        from torchvision.transforms.v2 import functional as TF

        size = self.opts.size
        frames = TF.resize(frames, size, antialias=True)
        height, width = frames.shape[-2:]
        out = []
        for j in range(self.opts.crops):
            frac = 0.5 if self.opts.crops == 1 else j / (self.opts.crops - 1)
            top, left = round((height - size) * frac), round((width - size) * frac)
            if width > height:
                top = (height - size) // 2
            else:
                left = (width - size) // 2
            out.append(self.normalise(frames[..., top:top + size, left:left + size]))
        return out


# ------------------------------------------------------------------------------------------------ dataset
def _is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


def _read_list(path: Path) -> list[tuple[str, int]]:
    """``path label`` lines (comma or whitespace separated); a non-numeric first line is a header."""
    samples = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
            if lineno == 1 and not samples:
                continue
            raise DataError(f"{path}:{lineno}: expected 'path label' (label an integer), got {line!r}")
        name, label = parts[0].strip(), int(parts[1])
        if label < 0:
            raise DataError(f"{path}:{lineno}: negative label {label}")
        samples.append((name if Path(name).is_absolute() else str(path.parent / name), label))
    if not samples:
        raise DataError(f"{path} lists no videos")
    return samples


def _folder_samples(split_dir: Path) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} holds no class folders (expected one sub-folder of videos per class)")
    samples = []
    for label, cls in enumerate(classes):
        files = sorted(str(p) for p in (split_dir / cls).rglob("*") if p.is_file() and _is_video(p.name))
        if not files:
            raise DataError(f"class folder {split_dir / cls} holds no videos ({', '.join(VIDEO_EXTENSIONS)})")
        samples += [(f, label) for f in files]
    return samples, classes


def video_splits(root: str | Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train samples, evaluation samples, class names) of a Kinetics-style folder (see the module doc)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"video data path {root} is not a folder (expected train.csv and val.csv, or train/ and "
                        f"val/ class folders, or 'moving-shapes' for the bundled set)")
    lists = {p.stem: p for p in root.glob("*.csv")}
    if "train" in lists and ("val" in lists or "test" in lists):
        train, val = _read_list(lists["train"]), _read_list(lists.get("val") or lists["test"])
        names_file = root / "classes.txt"
        count = max(label for _, label in train + val) + 1
        names = names_file.read_text().split("\n") if names_file.is_file() else []
        names = [n.strip() for n in names if n.strip()]
        if names and len(names) < count:
            raise DataError(f"{names_file} names {len(names)} classes but the lists use label {count - 1}")
        return train, val, names or [str(i) for i in range(count)]
    subdirs = [p.name for p in root.iterdir() if p.is_dir()]
    files = [p.name for p in root.iterdir() if p.is_file()]
    train_dir = root / resolve_split_name(subdirs, "train", f"video folder {root} (no train.csv + val.csv)", files)
    val_dir = root / resolve_split_name(subdirs, "val", f"video folder {root}", files)
    train, classes = _folder_samples(train_dir)
    val, val_classes = _folder_samples(val_dir)
    if val_classes != classes:
        raise DataError(f"{train_dir} and {val_dir} have different class folders")
    return train, val, classes


class VideoDataset(Dataset):
    """Videos with labels; item = ``(clip or None, label, unreadable files met)`` (see the module doc)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], clip: ClipOptions, train: bool) -> None:
        require_av()
        self.samples, self.classes, self.clip, self.train = samples, classes, clip, train
        self.transform = ClipTransform(clip, train)
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tensor:
        """The sample's clip (training) or its views (evaluation); raises on an unreadable file."""
        path = self.samples[index][0]
        frames_per_clip = self.clip.num_frames
        if self.train:
            frames, rows = read_frames(path, lambda total: train_indices(total, frames_per_clip))
            return self.transform(frames[rows])
        clips = self.clip.clips
        frames, rows = read_frames(path, lambda total: sum(eval_indices(total, frames_per_clip, clips), []))
        views = [view for k in range(clips)
                 for view in self.transform.crops(frames[rows[k * frames_per_clip:(k + 1) * frames_per_clip]])]
        return views[0] if len(views) == 1 else torch.stack(views)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, int]:
        failed = 0
        for attempt in range(MAX_RETRIES if self.train else 1):
            current = (index + attempt) % len(self.samples)
            try:
                return self.load(current), self.samples[current][1], failed
            except Exception as err:  # noqa: BLE001 (any decoder failure: the file is skipped, counted)
                failed += 1
                warnings.warn(f"skipping unreadable video {self.samples[current][0]}: "
                              f"{type(err).__name__}: {err}", UnreadableVideoWarning, stacklevel=2)
        if self.train:
            raise DataError(f"{MAX_RETRIES} unreadable videos in a row from {self.samples[index][0]}: "
                            f"is the video data readable at all?")
        return None, self.samples[index][1], failed


def collate_clips(items: list[tuple[Tensor | None, int, int]]) -> tuple[Tensor | None, Tensor | None, int]:
    """Stack the readable samples; the third element counts the unreadable files met (workers included)."""
    failed = sum(item[2] for item in items)
    kept = [(x, y) for x, y, _ in items if x is not None]
    if not kept:
        return None, None, failed
    return torch.stack([x for x, _ in kept]), torch.tensor([y for _, y in kept]), failed
