"""The DyVM selector policies of speed measurements (mambatrim.engine.dyvm_selectors): calibrated per-image selectors make each (layer, direction)
run for exactly its requested share of the calibration images, and a trained model's shares load and stretch."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from mambatrim.engine import dyvm_selectors
from mambatrim.models import create_model
from mambatrim.reduce import dyvm


@torch.no_grad()
def test_per_layer_shares_are_realised_on_the_calibration_images() -> None:
    torch.manual_seed(0)
    dense = create_model("vim_tiny_patch16_224", depth=4, img_size=32, patch_size=8, stride=8,
                         num_classes=10).eval()
    model = dyvm.deploy(dyvm.apply(copy.deepcopy(dense), keep_ratio=0.7, block_ratio=0.8, pruning_layers=[2]))
    images = torch.randn(16, 3, 32, 32)
    shares = [(1.0, 1.0), (1.0, 0.0), (0.5, 1.0), (0.25, 0.75)]
    dyvm_selectors.set_per_image_block_policy(model, images, shares)
    model(images)
    ran = [tuple(layer.mixer.last_stats["gate"].float().mean(0).tolist()) for layer in model.layers]
    assert ran == shares
    assert dyvm.realised_block_ratio(model) == pytest.approx(sum(map(sum, shares)) / 8)
    with pytest.raises(ValueError, match="4 layers"):
        dyvm_selectors.set_per_image_block_policy(model, images, shares[:3])


def test_direction_shares_load_from_a_cifar_result_and_stretch_over_the_depth(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"dyvm": {"direction_rates": {"0": [1.0, 1.0], "1": [1.0, 0.1], "2": [0.9, 0.5]}}}))
    loaded = dyvm_selectors.load_direction_shares(str(path), 6)
    assert loaded["source_depth"] == 3
    assert loaded["shares"] == [(1.0, 1.0)] * 2 + [(1.0, 0.1)] * 2 + [(0.9, 0.5)] * 2
    path.write_text(json.dumps({"0": [1.0, 1.5]}))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        dyvm_selectors.load_direction_shares(str(path), 6)
    path.write_text(json.dumps({"dyvm": {"top1": 75.0}}))
    with pytest.raises(ValueError, match="no per-layer direction shares"):
        dyvm_selectors.load_direction_shares(str(path), 6)


@torch.no_grad()
def test_static_policy_switches_off_the_same_pairs_for_every_image() -> None:
    torch.manual_seed(0)
    model = dyvm.deploy(dyvm.apply(create_model("vim_tiny_patch16_224", depth=5, img_size=32, patch_size=8, stride=8),
                                   keep_ratio=None, block_ratio=0.8))
    chosen = dyvm_selectors.set_selector_policy(model, "static", 0.8, torch.randn(4, 3, 32, 32))
    off = chosen["directions_off"]
    assert len(off) == round(0.2 * 2 * 5) == 2 and len(set(off)) == 2  # (1 - block_ratio) of the 2 x depth pairs
    model(torch.randn(6, 3, 32, 32))
    for i, layer in enumerate(model.layers):
        gate = layer.mixer.last_stats["gate"].float()
        assert gate.tolist() == [[0.0 if (i, d) in off else 1.0 for d in (0, 1)]] * 6
    with pytest.raises(ValueError, match="needs DyVM's block_ratio"):
        dyvm_selectors.set_selector_policy(model, "per_image", None, torch.randn(4, 3, 32, 32))
    with pytest.raises(ValueError, match="static, per_image"):
        dyvm_selectors.set_selector_policy(model, "sometimes", 0.8, torch.randn(4, 3, 32, 32))
