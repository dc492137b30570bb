"""Every registered method applies to the demo model with its demo options and really reduces its work."""
from __future__ import annotations

import pytest
import torch

from mambatrim.analysis import count_flops
from mambatrim.engine.demo import DEMO_RECIPE
from mambatrim.models import create_model
from mambatrim.reduce import METHODS, apply_method, parse_method_options
from mambatrim.reduce.registry import sequence_methods


def demo_model() -> torch.nn.Module:
    return create_model(DEMO_RECIPE["model"], **DEMO_RECIPE["model_kwargs"], img_size=DEMO_RECIPE["input_size"],
                        in_chans=DEMO_RECIPE["in_chans"], num_classes=10).eval()


def test_the_four_method_families_are_registered() -> None:
    assert {"dyvm", "rmeeto", "top", "prune_random", "prune_static", "prune_norm"} <= set(METHODS)


@pytest.mark.parametrize("name", sequence_methods())
def test_demo_options_fit_the_demo_model(name: str) -> None:
    dense = count_flops(demo_model()).gflops("paper")
    model = apply_method(demo_model(), name, **METHODS[name].demo_options)
    with torch.no_grad():
        logits = model(torch.randn(2, DEMO_RECIPE["in_chans"], DEMO_RECIPE["input_size"], DEMO_RECIPE["input_size"]))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert count_flops(model).gflops("paper") < 0.95 * dense  # the demo row shows a real reduction


def test_unknown_method_and_bad_option_syntax_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown reduction method 'tome'.*known methods"):
        apply_method(demo_model(), "tome")
    with pytest.raises(ValueError, match="key=value"):
        parse_method_options(["ratio0.3"])


def test_options_and_config_files_read_exponent_floats(tmp_path) -> None:
    """YAML 1.1 (PyYAML) reads ``2e-4`` as text; a learning rate written so must still be a number."""
    from mambatrim.engine.config import load_yaml

    assert parse_method_options(["lr=2e-4", "r=11", "layers=[6, 12]", "w=-1E+2", "name=1e"]) == {
        "lr": 2e-4, "r": 11, "layers": [6, 12], "w": -100.0, "name": "1e"}
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-6\nmin_lr: 1.0e-5\nepochs: 30\n")
    assert load_yaml(path) == {"lr": 5e-6, "min_lr": 1e-5, "epochs": 30}
