"""Semantic-segmentation data in the ADE20K layout, its augmentation and the bundled generated set.

Layout: ``ROOT/images/{training,validation}/*.jpg`` with ``ROOT/annotations/{training,validation}/*.png`` of
the same stem, one class id per pixel, 0 = unlabelled. Labels are reduced as mmseg's ``reduce_zero_label``
(0 -> 255 = ignored, k -> k - 1), so ADE20K's 150 classes are 0..149.

Training pipeline (mmseg's ADE20K recipe, image and mask transformed jointly with torchvision's v2 transforms
on ``tv_tensors.Mask``): random resize to the (2048, 512) scale times a ratio in [0.5, 2.0] (aspect kept), a
random 512 crop whose largest class covers at most 75 % of it (``cat_max_ratio``, up to 10 tries), horizontal
flip, photometric distortion (brightness, contrast, saturation, hue), normalisation, padding to the crop
(image 0, mask 255). Evaluation resizes to the same scale; the label stays at full resolution.

Bundled default: :func:`bundled_root` writes a generated set once into the user cache (JPEG images, PNG
labels): textured backgrounds with pasted circles, squares, triangles and scikit-learn's handwritten digits,
each class one id, one-pixel outlines unlabelled.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..validation import check_choice
from .datasets import DataError

IGNORE_INDEX = 255
SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUNDLED_CLASSES = ["background", "circle", "square", "triangle"] + [f"digit {d}" for d in range(10)]
BUNDLED_VERSION = "segshapes-v1"


def reduce_zero_label(label: Tensor) -> Tensor:
    """mmseg's reduce_zero_label: 0 (unlabelled) -> 255, k -> k - 1 (uint8 in, long out)."""
    label = label.long()
    return torch.where(label == 0, IGNORE_INDEX, label - 1)


class SegmentationFolder(Dataset):
    """(image, label) pairs of one split of an ADE20K-layout folder; ``transform(image, mask)`` jointly."""

    def __init__(self, root: str | os.PathLike, split: str,
                 transform: Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[Tensor, Tensor]] | None = None,
                 reduce_zero: bool = True) -> None:
        check_choice(split, "split", SPLITS)
        self.root, self.split = Path(root), SPLITS[split]
        image_dir, label_dir = self.root / "images" / self.split, self.root / "annotations" / self.split
        if not image_dir.is_dir() or not label_dir.is_dir():
            raise DataError(f"{self.root} is not in the ADE20K layout: expected images/{self.split}/ and "
                            f"annotations/{self.split}/")
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not self.images:
            raise DataError(f"no images in {image_dir}")
        self.labels = [label_dir / f"{p.stem}.png" for p in self.images]
        missing = [p.name for p in self.labels if not p.exists()]
        if missing:
            raise DataError(f"{len(missing)} images of {image_dir} have no label PNG, e.g. {missing[0]}")
        self.transform, self.reduce_zero = transform, reduce_zero

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image = tv_tensors.Image(TF.pil_to_tensor(Image.open(self.images[index]).convert("RGB")))
        label = torch.from_numpy(np.array(Image.open(self.labels[index])))
        label = reduce_zero_label(label) if self.reduce_zero else label.long()
        return image, tv_tensors.Mask(label[None])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.load(index)
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask[0]


class CappedRandomCrop(torch.nn.Module):
    """Random ``size`` crop of image and mask; retried (up to ``tries``) while one class covers more than
    ``cat_max_ratio`` of the crop's labelled pixels (mmseg's RandomCrop), then padded to ``size``."""

    def __init__(self, size: int, cat_max_ratio: float = 0.75, tries: int = 10) -> None:
        super().__init__()
        self.size, self.cat_max_ratio, self.tries = size, cat_max_ratio, tries

    def window(self, height: int, width: int) -> tuple[int, int]:
        return (random.randint(0, max(height - self.size, 0)), random.randint(0, max(width - self.size, 0)))

    def forward(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        height, width = mask.shape[-2:]
        top, left = self.window(height, width)
        for _ in range(self.tries - 1):
            if self.cat_max_ratio >= 1.0 or _class_share_ok(mask, top, left, self.size, self.cat_max_ratio):
                break
            top, left = self.window(height, width)
        h, w = min(self.size, height), min(self.size, width)  # (a crop past the border would pad with 0)
        image, mask = TF.crop(image, top, left, h, w), TF.crop(mask, top, left, h, w)
        pad_h, pad_w = self.size - mask.shape[-2], self.size - mask.shape[-1]
        if pad_h > 0 or pad_w > 0:  # right / bottom padding: image 0, mask ignored
            image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
        return image, mask


def _class_share_ok(mask: Tensor, top: int, left: int, size: int, cap: float) -> bool:
    """mmseg's test: more than one class in the crop and the largest below ``cap`` of the labelled pixels."""
    crop = mask[..., top:top + size, left:left + size]
    counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten())
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max().item() / counts.sum().item() < cap


class Normalise(torch.nn.Module):
    """uint8 image -> float, ImageNet mean / std; mask -> (H, W) long."""

    def forward(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        image = TF.normalize(TF.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
        return image.as_subclass(Tensor), mask.as_subclass(Tensor)[0].long()


class ScaleResize(torch.nn.Module):
    """Resize keeping the aspect so the image fits ``scale`` (long, short) times a ratio drawn from
    ``ratio_range`` (mmseg's RandomResize with keep_ratio; a fixed ratio 1 at evaluation)."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float] = (1.0, 1.0)) -> None:
        super().__init__()
        self.scale, self.ratio_range = scale, ratio_range

    def target_size(self, height: int, width: int, ratio: float = 1.0) -> list[int]:
        factor = min(self.scale[0] * ratio / max(height, width), self.scale[1] * ratio / min(height, width))
        return [max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))]

    def forward(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        size = self.target_size(*image.shape[-2:], random.uniform(*self.ratio_range))
        return TF.resize(image, size, antialias=True), TF.resize(mask, size)


def train_transform(crop: int = 512, scale: tuple[int, int] = (2048, 512), cat_max_ratio: float = 0.75) -> v2.Compose:
    """mmseg's ADE20K training pipeline on (image, mask)."""
    return v2.Compose([
        ScaleResize(scale, (0.5, 2.0)),
        CappedRandomCrop(crop, cat_max_ratio),
        v2.RandomHorizontalFlip(0.5),
        v2.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360),
        Normalise(),
    ])


def eval_transform(scale: tuple[int, int] = (2048, 512)) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Evaluation: the image resized to ``scale`` (aspect kept) and normalised; the label at full resolution."""
    resize, norm = ScaleResize(scale), Normalise()

    def apply(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return norm(TF.resize(image, resize.target_size(*image.shape[-2:]), antialias=True), mask)

    return apply


# ---------------------------------------------------------------------------------------------- bundled set
def cache_dir() -> Path:
    """The user cache folder of mambatrim (``$XDG_CACHE_HOME/mambatrim`` or ``~/.cache/mambatrim``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mambatrim"


def bundled_root(size: int = 128, train: int = 400, val: int = 100, seed: int = 0,
                 folder: str | os.PathLike | None = None) -> Path:
    """The generated segmentation set (ADE20K layout), written on first use and reused afterwards."""
    root = Path(folder) if folder is not None else cache_dir() / f"{BUNDLED_VERSION}-{size}-{train}-{val}-{seed}"
    if (root / "done").exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    glyphs = _digit_glyphs()
    for split, count in (("training", train), ("validation", val)):
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            image, label = generate_scene(rng, size, glyphs)
            image.save(tmp / "images" / split / f"{split}_{i:05d}.jpg", quality=95)
            label.save(tmp / "annotations" / split / f"{split}_{i:05d}.png")
    (tmp / "done").write_text("\n".join(BUNDLED_CLASSES) + "\n")
    if root.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, root)
    return root


def _digit_glyphs() -> list[tuple[np.ndarray, int]]:
    """scikit-learn's 8x8 handwritten digits as (intensity 0..1, digit) pairs."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return [(img / 16.0, int(t)) for img, t in zip(bunch.images, bunch.target)]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float texture: two coloured stripe patterns plus noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((size, size, 3))
    for _ in range(2):
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 12)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        out += wave[..., None] * rng.uniform(0, 0.5, 3)
    return np.clip(out + rng.normal(0, 0.04, out.shape), 0, 1)


def generate_scene(rng: np.random.Generator, size: int,
                   glyphs: list[tuple[np.ndarray, int]]) -> tuple[Image.Image, Image.Image]:
    """One image with 2-5 pasted objects on a textured background and its label PNG (ids as
    :data:`BUNDLED_CLASSES` + 1, 0 on each object's one-pixel outline)."""
    image = _texture(rng, size)
    label = np.ones((size, size), dtype=np.uint8)  # background = id 1
    for _ in range(rng.integers(2, 6)):
        shape = np.zeros((size, size), dtype=bool)
        extent = int(rng.integers(size // 5, size // 2))
        x0, y0 = (int(v) for v in rng.integers(0, size - extent, 2))
        kind = int(rng.integers(0, 4))
        if kind < 3:
            canvas = Image.new("L", (size, size))
            draw = ImageDraw.Draw(canvas)
            box = (x0, y0, x0 + extent, y0 + extent)
            if kind == 0:
                draw.ellipse(box, fill=255)
            elif kind == 1:
                draw.rectangle(box, fill=255)
            else:
                draw.polygon([(x0, y0 + extent), (x0 + extent, y0 + extent), (x0 + extent // 2, y0)], fill=255)
            shape, cls = np.array(canvas) > 127, 2 + kind
        else:
            glyph, digit = glyphs[int(rng.integers(len(glyphs)))]
            big = Image.fromarray((glyph * 255).astype(np.uint8)).resize((extent, extent), Image.BILINEAR)
            shape[y0:y0 + extent, x0:x0 + extent] = np.array(big) > 110
            cls = 5 + digit
        colour = rng.uniform(0, 1, 3)
        image[shape] = 0.7 * colour + 0.3 * _texture(rng, size)[shape]
        outline = np.array(Image.fromarray(shape.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0
        label[outline & ~shape] = 0
        label[shape] = cls
    pixels = Image.fromarray((image * 255).astype(np.uint8))
    return pixels, Image.fromarray(label)


def segmentation_datasets(root: str | os.PathLike | None, crop: int, scale: tuple[int, int],
                          cat_max_ratio: float = 0.75) -> dict[str, Any]:
    """Train and validation datasets of an ADE20K-layout ``root`` (``None``: the bundled set)."""
    root = bundled_root() if root is None else Path(root)
    return {"train": SegmentationFolder(root, "train", train_transform(crop, scale, cat_max_ratio)),
            "val": SegmentationFolder(root, "val", eval_transform(scale)), "root": root}
