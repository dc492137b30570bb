"""The bundled video set: moving shapes, written as real encoded videos (MPEG-4 in .mp4) with train/val lists.

Ten classes = five shapes x two motion directions (left-to-right, right-to-left): one frame shows the shape but
not the direction, so a single frame cannot do better than one class in two. Colours, sizes, speeds, start
positions, a vertical drift and background noise vary per clip. Made once (seeded, about 400 clips of 16
frames at 32x32, a few seconds) under ``$XDG_CACHE_HOME/mambatrim`` (or ``~/.cache/mambatrim``), written to a
temporary folder and renamed into place, so concurrent first uses never see half a set.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .video import require_av

SHAPES = ("square", "disc", "triangle", "cross", "ring")
DIRECTIONS = ("right", "left")
VERSION = 1


def class_names() -> list[str]:
    return [f"{shape}_{direction}" for shape in SHAPES for direction in DIRECTIONS]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mambatrim"


def shape_mask(shape: str, radius: int) -> np.ndarray:
    """A (2r+1, 2r+1) boolean mask of the shape."""
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    if shape == "square":
        return np.ones_like(x, dtype=bool)
    if shape == "disc":
        return x * x + y * y <= radius * radius
    if shape == "triangle":
        return (y >= -radius) & (np.abs(x) <= (y + radius) / 2)
    if shape == "cross":
        return (np.abs(x) <= radius // 3) | (np.abs(y) <= radius // 3)
    if shape == "ring":
        return np.maximum(np.abs(x), np.abs(y)) >= radius - max(1, radius // 3)
    raise ValueError(f"unknown shape {shape!r} (valid: {', '.join(SHAPES)})")


def render_clip(label: int, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (frames, size, size, 3): shape ``label // 2`` moving in direction ``label % 2``."""
    shape, direction = SHAPES[label // 2], DIRECTIONS[label % 2]
    radius = int(rng.integers(size // 8, size // 5 + 1))
    mask = shape_mask(shape, radius)
    travel = size - 2 * radius - 1
    speed = rng.uniform(0.6, 1.0) * travel / max(frames - 1, 1)
    x0 = rng.uniform(0, travel - speed * (frames - 1))
    y0, drift = rng.uniform(0, size - 2 * radius - 1), rng.uniform(-0.3, 0.3)
    colour = rng.integers(96, 256, 3)
    background = rng.integers(0, 64, 3)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        step = t if direction == "right" else frames - 1 - t
        left = int(round(x0 + speed * step))
        top = int(np.clip(round(y0 + drift * t), 0, size - mask.shape[0]))
        frame = np.clip(background + rng.normal(0, 6, (size, size, 3)), 0, 255)
        frame[top:top + mask.shape[0], left:left + mask.shape[1]][mask] = colour
        video[t] = frame.astype(np.uint8)
    return video


def write_video(path: Path, video: np.ndarray, fps: int = 8) -> None:
    """Encode uint8 (T, H, W, 3) frames as MPEG-4 at high quality."""
    av = require_av()
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000
        for array in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def make_moving_shapes(folder: Path, per_class: int = 40, frames: int = 16, size: int = 32,
                       val_fraction: float = 0.25, seed: int = 0) -> Path:
    """Write the set into ``folder`` (videos/, train.csv, val.csv, classes.txt); returns ``folder``."""
    rng = np.random.default_rng(seed)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    names = class_names()
    val_count = max(1, round(per_class * val_fraction))
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for label, name in enumerate(names):
        for i in range(per_class):
            rel = f"videos/{name}_{i:03d}.mp4"
            write_video(folder / rel, render_clip(label, frames, size, rng))
            lists["val" if i < val_count else "train"].append(f"{rel} {label}")
    for split, lines in lists.items():
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    return folder


def moving_shapes(root: Path | None = None, per_class: int = 40, frames: int = 16, size: int = 32) -> Path:
    """The cached set's folder, made on first use."""
    root = root or cache_root()
    target = root / f"moving-shapes-v{VERSION}-{per_class}x{frames}x{size}px"
    if (target / "val.csv").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".moving-shapes-", dir=root))
    try:
        make_moving_shapes(staging, per_class, frames, size)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "val.csv").is_file():  # not a concurrent maker that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
