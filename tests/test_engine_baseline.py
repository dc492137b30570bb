"""mambatrim.engine.baseline: a dense checkpoint's model and data settings carry into fine-tuning, its run and
optimiser settings do not."""
from __future__ import annotations

import pytest

from mambatrim.engine.baseline import RUN_KEYS, baseline_settings, baseline_shape


def test_model_and_data_settings_carry_over_run_settings_do_not() -> None:
    recorded = {"model": "vim_tiny_patch16_224", "model_kwargs": {"depth": 12}, "batch_size": 64, "mixup": 0.8,
                "lr": 1e-3, "epochs": 300, "drop_path": 0.1, "output_dir": "runs/x", "not_a_field": 1}
    assert baseline_settings({"config": recorded}) == {"model": "vim_tiny_patch16_224", "model_kwargs": {"depth": 12},
                                                       "batch_size": 64, "mixup": 0.8}
    assert {"lr", "epochs", "drop_path", "output_dir"} <= set(RUN_KEYS)
    with pytest.raises(ValueError, match="records no training config"):
        baseline_settings({"model": {}})


@pytest.mark.parametrize("model, kwargs, expected", [
    # 32 px in 2 px patches = 256 patches; Vim adds its class token, MambaReg its 12 registers, PlainMamba none
    ("vim_tiny_patch16_224", {"depth": 12, "patch_size": 2, "stride": 2}, (257, 12, 1)),
    ("mambar_tiny_patch16_224", {"depth": 12, "patch_size": 2}, (268, 12, 12)),
    ("plainmamba_l1", {"depth": 12, "patch_size": 2}, (256, 12, 0)),
])
def test_baseline_shape_counts_the_protected_tokens(model, kwargs, expected) -> None:
    """What R-MeeTo's r for a ratio and ToP's kept counts are computed from: a method's schedule on MambaReg
    must set all 12 registers aside, not one class token."""
    settings = {"model": model, "model_kwargs": kwargs, "input_size": 32, "num_classes": 10}
    assert baseline_shape(settings) == expected
