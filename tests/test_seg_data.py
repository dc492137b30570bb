"""ADE20K-layout data: reading, reduce-zero-label, joint augmentation, the class-share crop cap, the bundled set."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from mambatrim.data.datasets import DataError
from mambatrim.data.segmentation import (IGNORE_INDEX, CappedRandomCrop, SegmentationFolder, bundled_root,
                                          reduce_zero_label, train_transform)


def write_layout(root, labels: list[np.ndarray], split: str = "training") -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(labels):
        # the image encodes its label (red = 10 * id), so joint transforms can be checked pixel by pixel
        rgb = np.stack([label * 10, np.zeros_like(label), np.zeros_like(label)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / split / f"img{i}.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "annotations" / split / f"img{i}.png")


def test_reduce_zero_label() -> None:
    assert reduce_zero_label(torch.tensor([0, 1, 2, 150], dtype=torch.uint8)).tolist() == [IGNORE_INDEX, 0, 1, 149]


def test_folder_reads_pairs_with_reduced_labels(tmp_path) -> None:
    label = np.array([[0, 1], [2, 3]])
    write_layout(tmp_path, [label])
    image, mask = SegmentationFolder(tmp_path, "train")[0]
    assert image.shape == (3, 2, 2)
    assert mask.tolist() == [[IGNORE_INDEX, 0], [1, 2]]


def test_layout_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(DataError, match="not in the ADE20K layout: expected images/validation/"):
        SegmentationFolder(tmp_path, "val")
    with pytest.raises(ValueError, match="unknown split 'test'; choose one of train, training, val, validation"):
        SegmentationFolder(tmp_path, "test")
    write_layout(tmp_path, [np.ones((2, 2))])
    (tmp_path / "annotations" / "training" / "img0.png").unlink()
    with pytest.raises(DataError, match="have no label PNG, e.g. img0.png"):
        SegmentationFolder(tmp_path, "train")


def test_train_transform_keeps_image_and_mask_aligned(tmp_path) -> None:
    rng = np.random.default_rng(0)
    label = np.kron(rng.integers(1, 6, (6, 6)), np.ones((8, 8), dtype=np.int64))  # 48x48 blocks of classes
    write_layout(tmp_path, [label])
    raw = SegmentationFolder(tmp_path, "train")
    image, mask = raw.load(0)
    random.seed(0)
    torch.manual_seed(0)
    crop = CappedRandomCrop(32, cat_max_ratio=1.0)
    flip = train_transform(32, (96, 32)).transforms[2]
    for _ in range(5):
        img, m = flip(*crop(image, mask))
        red = img[0].long()
        labelled = m[0] != IGNORE_INDEX
        assert torch.equal(red[labelled], (m[0][labelled] + 1) * 10)  # reduced label k came from id k + 1


def test_full_pipeline_shapes_and_padding(tmp_path) -> None:
    write_layout(tmp_path, [np.full((20, 30), 3)])
    ds = SegmentationFolder(tmp_path, "train", train_transform(64, (32, 16)))
    torch.manual_seed(0)
    image, mask = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert mask.shape == (64, 64) and mask.dtype == torch.long
    assert set(mask.unique().tolist()) <= {2, IGNORE_INDEX} and (mask == IGNORE_INDEX).any()  # padded


def test_crop_cap_rejects_single_class_windows() -> None:
    # left 3/4 of the image is class 0, a right strip class 1: windows inside the left part are 100 % one class
    label = torch.zeros(1, 40, 40, dtype=torch.long)
    label[:, :, 30:] = 1
    image, mask = tv_tensors.Image(torch.zeros(3, 40, 40, dtype=torch.uint8)), tv_tensors.Mask(label)
    crop = CappedRandomCrop(16, cat_max_ratio=0.75, tries=50)
    random.seed(0)
    for _ in range(20):
        _, m = crop(image, mask)
        counts = torch.bincount(m.flatten(), minlength=2)
        assert counts.max() / counts.sum() < 0.75
    random.seed(0)
    uncapped = [crop_window_share(CappedRandomCrop(16, 1.0), image, mask) for _ in range(20)]
    assert max(uncapped) == 1.0  # without the cap single-class windows do occur


def crop_window_share(crop, image, mask) -> float:
    _, m = crop(image, mask)
    counts = torch.bincount(m.flatten(), minlength=2)
    return float(counts.max() / counts.sum())


def test_bundled_set_is_real_files_in_the_layout(tmp_path) -> None:
    root = bundled_root(size=32, train=3, val=2, folder=tmp_path / "bundled")
    assert len(list((root / "images" / "training").glob("*.jpg"))) == 3
    assert len(list((root / "annotations" / "validation").glob("*.png"))) == 2
    _, mask = SegmentationFolder(root, "val")[0]
    values = set(mask.unique().tolist())
    assert 0 in values and values <= set(range(14)) | {IGNORE_INDEX}  # background (id 1 -> 0) and objects
    assert bundled_root(size=32, train=3, val=2, folder=root) == root  # reused, not regenerated
