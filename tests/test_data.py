"""Data: bundled digits, zip files read in place, folders, and clear errors for bad input."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from mambatrim.data import DataError, DataOptions, ZipClassFolderDataset, build_data, digits_dataset
from mambatrim.data.datasets import ClassFolderDataset


def _png(color: int, size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (color, 255 - color, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _make_zip(path: Path, splits=("train", "val"), classes=("cat", "dog"), per_class=3, extra=None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for split in splits:
            for c, cls in enumerate(classes):
                for i in range(per_class):
                    zf.writestr(f"{split}/{cls}/{i}.png", _png(40 * c + i))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def test_digits_split_sizes_and_values():
    train, val = digits_dataset("train", 16), digits_dataset("val", 16)
    assert (len(train), len(val)) == (1437, 360)
    assert train.images.shape == (1437, 1, 16, 16) and train.images.dtype == torch.uint8
    assert sorted(train.targets.unique().tolist()) == list(range(10))
    assert train.images.max() == 255 and train.images.min() == 0


def test_zip_read_in_place_matches_its_members(tmp_path):
    path = _make_zip(tmp_path / "d.zip", splits=("train", "test"))
    train = ZipClassFolderDataset(path, "train")
    val = ZipClassFolderDataset(path, "val")  # falls back to test/
    assert val.split == "test" and train.classes == ["cat", "dog"] and len(train) == 6
    img, label = train[4]  # dog/1.png
    assert label == 1 and img.getpixel((0, 0)) == (41, 214, 7)


def test_zip_memory_path_batches(tmp_path):
    path = _make_zip(tmp_path / "d.zip", per_class=4)
    opts = DataOptions(data_path=str(path), data_mode="memory", input_size=6, batch_size=4, num_workers=0,
                       gpu_aug_pad=0, gpu_aug_flip=False, mean=(0.0,), std=(1.0,))
    bundle = build_data(opts, torch.device("cpu"))
    bundle.train.set_epoch(0)
    batches = list(bundle.train)
    assert bundle.mode == "memory" and len(batches) == 2 and batches[0][0].shape == (4, 3, 6, 6)
    labels = sorted(torch.cat([y for _, y in batches]).tolist())
    assert labels == [0] * 4 + [1] * 4
    x, y = next(iter(bundle.val))
    expected = torch.tensor([40 * y[0].item() + 0, 255 - 40 * y[0].item(), 7]) / 255  # first val image per class
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-6)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_data(DataOptions(data_path=str(tmp_path / "nope")), torch.device("cpu"))


def test_zip_without_train_folder(tmp_path):
    path = _make_zip(tmp_path / "d.zip", splits=("val",))
    with pytest.raises(DataError, match="no train/ folder"):
        ZipClassFolderDataset(path, "train")


def test_empty_class_folder_is_named(tmp_path):
    path = _make_zip(tmp_path / "d.zip", extra={"train/empty_class/": b""})
    with pytest.raises(DataError, match="empty_class"):
        ZipClassFolderDataset(path, "train")
    root = tmp_path / "folder" / "train"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "x.png").write_bytes(_png(1))
    with pytest.raises(DataError, match=r"class folder .*b holds no images"):
        ClassFolderDataset(root)


def test_undecodable_image_names_the_file(tmp_path):
    path = _make_zip(tmp_path / "d.zip", extra={"train/cat/broken.jpg": b"not an image at all"})
    ds = ZipClassFolderDataset(path, "train")
    index = [n for n, _ in ds.samples].index("train/cat/broken.jpg")
    with pytest.raises(DataError, match="broken.jpg"):
        ds[index]
    opts = DataOptions(data_path=str(path), data_mode="memory", input_size=6, batch_size=2, num_workers=0)
    with pytest.raises(DataError, match="broken.jpg"):  # the in-memory path decodes all before training
        build_data(opts, torch.device("cpu"))
