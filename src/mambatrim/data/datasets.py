"""Datasets: image folders, zip files of class folders (read in place), and the bundled digits.

Every constructor checks its input up front and raises :class:`DataError` naming the problem (missing path,
zip without ``train/``, empty class folder, undecodable image), so training never starts on data it cannot
finish.
"""
from __future__ import annotations

import io
import os
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_SPLITS = ("val", "test")


class DataError(ValueError):
    """Data that cannot be used: the message names the path, folder or file at fault."""


def decode_image(data: bytes | str | os.PathLike, name: str, mode: str = "RGB") -> Image.Image:
    """Decode one image fully (not lazily), naming the file if it is not a readable image."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot decode image {name}: {err}") from err


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def resolve_split_name(available: list[str], split: str, where: str, files: list[str] = ()) -> str:
    """'train' must exist; 'val' falls back to 'test' (and vice versa). ``files``: the loose files next to the
    folders, described in the error so a wrong layout is recognisable."""
    if split in available:
        return split
    if split in EVAL_SPLITS:
        for alt in EVAL_SPLITS:
            if alt in available:
                return alt
    wanted = "train/" if split == "train" else "val/ or test/"
    raise DataError(f"{where} has no {wanted} folder at its top level (found: {describe_entries(available, files)}); "
                    f"expected train/ and val/ (or test/), each holding one folder per class")


def describe_entries(folders: list[str], files: list[str], shown: int = 3) -> str:
    """'2 folders (a/, b/) and 120 loose images (1.png, 2.png, 3.png, ...)' -- what a data path holds."""
    def listing(names: list[str], noun: str, suffix: str = "") -> str:
        names = sorted(names)
        head = ", ".join(n + suffix for n in names[:shown]) + (", ..." if len(names) > shown else "")
        return f"{len(names)} {noun}{'s' if len(names) != 1 else ''} ({head})"

    images = [f for f in files if _is_image(f)]
    others = [f for f in files if not _is_image(f)]
    parts = [listing(folders, "folder", "/")] if folders else []
    parts += [listing(images, "loose image")] if images else []
    parts += [listing(others, "other file")] if others else []
    return " and ".join(parts) or "nothing"


class ClassFolderDataset(Dataset):
    """Images in ``root/CLASS/*.ext`` (torchvision ImageFolder layout) with clear errors.

    Returns ``(transform(PIL image), class index)``; classes are the sorted folder names.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None,
                 mode: str = "RGB") -> None:
        self.root, self.transform, self.mode = Path(root), transform, mode
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise DataError(f"{self.root} holds no class folders (expected one sub-folder per class)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for cls in self.classes:
            files = sorted(str(p) for p in (self.root / cls).rglob("*") if p.is_file() and _is_image(p.name))
            if not files:
                raise DataError(f"class folder {self.root / cls} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            self.samples += [(f, self.class_to_idx[cls]) for f in files]
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        return decode_image(path, path, self.mode)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load(index)
        return (self.transform(img) if self.transform else img), self.samples[index][1]


class ZipClassFolderDataset(Dataset):
    """``SPLIT/CLASS/*.ext`` members of a zip file, read in place (no extraction).

    Each process (DataLoader worker) opens its own handle on first use: zip handles must not be shared
    across processes.
    """

    def __init__(self, zip_path: str | os.PathLike, split: str, transform: Callable[[Image.Image], Any] | None = None,
                 mode: str = "RGB") -> None:
        self.zip_path, self.transform, self.mode = Path(zip_path), transform, mode
        if not self.zip_path.is_file():
            raise DataError(f"zip file {self.zip_path} does not exist")
        try:
            with zipfile.ZipFile(self.zip_path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as err:
            raise DataError(f"{self.zip_path} is not a readable zip file: {err}") from err
        prefix = _common_prefix(names)
        tops = sorted({n[len(prefix):].split("/", 1)[0] for n in names if "/" in n[len(prefix):]})
        loose = [n[len(prefix):] for n in names if n[len(prefix):] and "/" not in n[len(prefix):]]
        self.split = resolve_split_name(tops, split, f"zip file {self.zip_path}", loose)
        base = f"{prefix}{self.split}/"
        folders: dict[str, list[str]] = {}
        for name in names:
            if not name.startswith(base):
                continue
            rest = name[len(base):]
            if "/" not in rest:
                continue  # a file directly under SPLIT/: not in a class folder
            cls, tail = rest.split("/", 1)
            if cls.startswith(".") or cls == "__MACOSX":
                continue
            files = folders.setdefault(cls, [])
            if tail and not tail.endswith("/") and _is_image(tail):
                files.append(name)
        if not folders:
            raise DataError(f"zip file {self.zip_path}: {base} holds no class folders")
        empty = [c for c, f in folders.items() if not f]
        if empty:
            raise DataError(f"zip file {self.zip_path}: class folder {base}{sorted(empty)[0]}/ holds no images"
                            + (f" (nor do {len(empty) - 1} other class folders)" if len(empty) > 1 else ""))
        self.classes = sorted(folders)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(n, self.class_to_idx[c]) for c in self.classes for n in sorted(folders[c])]
        self.targets = [t for _, t in self.samples]
        self._handle: zipfile.ZipFile | None = None
        self._owner: tuple[int, int] | None = None

    def _zip(self) -> zipfile.ZipFile:
        owner = (os.getpid(), threading.get_ident())
        if self._handle is None or self._owner != owner:
            self._handle, self._owner = zipfile.ZipFile(self.zip_path), owner
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"], state["_owner"] = None, None
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        name = self.samples[index][0]
        return decode_image(self._zip().read(name), f"{name} in {self.zip_path}", self.mode)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load(index)
        return (self.transform(img) if self.transform else img), self.samples[index][1]


def _common_prefix(names: list[str]) -> str:
    """A single wrapping folder (``cifar10/train/...``) is looked through."""
    tops = {n.split("/", 1)[0] for n in names if n and not n.startswith("__MACOSX")}
    if len(tops) == 1:
        top = next(iter(tops))
        inner = {n.split("/", 2)[1] for n in names if n.startswith(top + "/") and n.count("/") >= 2}
        if "train" in inner and top != "train":
            return top + "/"
    return ""


class TensorImageDataset(Dataset):
    """Images decoded once into a uint8 tensor (N, C, H, W) with int64 labels: the small-data fast path."""

    def __init__(self, images: Tensor, targets: Tensor, classes: list[str]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images, self.targets, self.classes = images, targets.long(), classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]


def digits_dataset(split: str, img_size: int = 16, channels: int = 1, val_fraction: float = 0.2,
                   seed: int = 0) -> TensorImageDataset:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes), upscaled to ``img_size``.

    A fixed stratified split (seed 0): 1437 train / 360 val. Real data that ships with scikit-learn.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r} for the digits data (train, val)")
    bunch = load_digits()
    idx_train, idx_val = train_test_split(range(len(bunch.target)), test_size=val_fraction, random_state=seed,
                                          stratify=bunch.target)
    index = torch.tensor(idx_train if split == "train" else idx_val)
    images = torch.from_numpy(bunch.images).float()[index] / 16.0  # values 0..16
    images = images[:, None]
    if img_size != 8:
        images = torch.nn.functional.interpolate(images, size=(img_size, img_size), mode="bilinear",
                                                 align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, channels, -1, -1).contiguous()
    targets = torch.from_numpy(bunch.target)[index]
    return TensorImageDataset(images, targets, [str(i) for i in range(10)])


class ToUint8:
    """PIL image -> uint8 (C, H, W) tensor, bicubic-resized to ``size`` x ``size`` where it differs."""

    def __init__(self, size: int | None) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Tensor:
        from torchvision.transforms import functional as TF

        if self.size is not None and img.size != (self.size, self.size):
            img = TF.resize(img, [self.size, self.size], interpolation=TF.InterpolationMode.BICUBIC)
        return TF.pil_to_tensor(img)


def decode_to_tensors(dataset: ClassFolderDataset | ZipClassFolderDataset, size: int | None,
                      num_workers: int = 0) -> TensorImageDataset:
    """Decode every image once into uint8 (resized to ``size`` if the images differ from it)."""
    from torch.utils.data import DataLoader

    previous, dataset.transform = dataset.transform, ToUint8(size)
    try:
        loader = DataLoader(dataset, batch_size=256, num_workers=num_workers, shuffle=False)
        chunks, labels = [], []
        for x, y in loader:
            if chunks and x.shape[1:] != chunks[0].shape[1:]:
                raise DataError("images differ in size: pass an input size so they can be resized")
            chunks.append(x)
            labels.append(y)
    finally:
        dataset.transform = previous
    return TensorImageDataset(torch.cat(chunks), torch.cat(labels), list(dataset.classes))
