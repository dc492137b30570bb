"""The selector policies of benchmarks/dyvm_speed.py: calibrated per-image selectors make each (layer, direction)
run for exactly its requested share of the calibration images, and a trained model's shares load and stretch."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dyvm_speed  # noqa: E402

from mambatrim.models import create_model  # noqa: E402
from mambatrim.reduce import dyvm  # noqa: E402


@torch.no_grad()
def test_per_layer_shares_are_realised_on_the_calibration_images() -> None:
    torch.manual_seed(0)
    dense = create_model("vim_tiny_patch16_224", depth=4, img_size=32, patch_size=8, stride=8,
                         num_classes=10).eval()
    model = dyvm.deploy(dyvm.apply(copy.deepcopy(dense), keep_ratio=0.7, block_ratio=0.8, pruning_layers=[2]))
    images = torch.randn(16, 3, 32, 32)
    shares = [(1.0, 1.0), (1.0, 0.0), (0.5, 1.0), (0.25, 0.75)]
    dyvm_speed.set_per_image_block_policy(model, images, shares)
    model(images)
    ran = [tuple(layer.mixer.last_stats["gate"].float().mean(0).tolist()) for layer in model.layers]
    assert ran == shares
    assert dyvm.realised_block_ratio(model) == pytest.approx(sum(map(sum, shares)) / 8)
    with pytest.raises(ValueError, match="4 layers"):
        dyvm_speed.set_per_image_block_policy(model, images, shares[:3])


def test_direction_shares_load_from_a_cifar_result_and_stretch_over_the_depth(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"dyvm": {"direction_rates": {"0": [1.0, 1.0], "1": [1.0, 0.1], "2": [0.9, 0.5]}}}))
    loaded = dyvm_speed.load_direction_shares(str(path), 6)
    assert loaded["source_depth"] == 3
    assert loaded["shares"] == [(1.0, 1.0)] * 2 + [(1.0, 0.1)] * 2 + [(0.9, 0.5)] * 2
    path.write_text(json.dumps({"0": [1.0, 1.5]}))
    with pytest.raises(SystemExit, match=r"in \[0, 1\]"):
        dyvm_speed.load_direction_shares(str(path), 6)
    path.write_text(json.dumps({"dyvm": {"top1": 75.0}}))
    with pytest.raises(SystemExit, match="no per-layer direction shares"):
        dyvm_speed.load_direction_shares(str(path), 6)


def test_fused_prune_steps_switch_the_steps_and_restore_them() -> None:
    from mambatrim.ops import policy

    def steps() -> tuple[bool, bool, bool]:
        return tuple(policy.get(n) for n in ("fused_row_gather", "fused_predictor_norm", "fused_predictor_head"))

    assert steps() == (True, True, True)  # the defaults
    with pytest.raises(RuntimeError):
        with dyvm_speed.fused_prune_steps(False, False):
            assert steps() == (False, False, False)
            raise RuntimeError("a failed capture")
    assert steps() == (True, True, True)
    with dyvm_speed.fused_prune_steps(True, False):
        assert steps() == (True, True, False)
    assert steps() == (True, True, True)
