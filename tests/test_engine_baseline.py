"""mambatrim.engine.baseline: a dense checkpoint's model and data settings carry into fine-tuning, its run and
optimiser settings do not."""
from __future__ import annotations

import pytest

from mambatrim.engine.baseline import RUN_KEYS, baseline_settings


def test_model_and_data_settings_carry_over_run_settings_do_not() -> None:
    recorded = {"model": "vim_tiny_patch16_224", "model_kwargs": {"depth": 12}, "batch_size": 64, "mixup": 0.8,
                "lr": 1e-3, "epochs": 300, "drop_path": 0.1, "output_dir": "runs/x", "not_a_field": 1}
    assert baseline_settings({"config": recorded}) == {"model": "vim_tiny_patch16_224", "model_kwargs": {"depth": 12},
                                                       "batch_size": 64, "mixup": 0.8}
    assert {"lr", "epochs", "drop_path", "output_dir"} <= set(RUN_KEYS)
    with pytest.raises(ValueError, match="records no training config"):
        baseline_settings({"model": {}})
