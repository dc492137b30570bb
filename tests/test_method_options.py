"""One vocabulary of method options: canonical names, the papers' aliases, one-line errors naming the valid ones."""
from __future__ import annotations

import pytest
import torch

from mambatrim import create_model
from mambatrim.reduce import METHODS, apply_method, parse_method_options


def tiny():
    return create_model("vim_tiny_patch16_224", depth=4, embed_dim=32, img_size=64, num_classes=5)


@pytest.mark.parametrize("name", sorted(n for n, spec in METHODS.items() if not spec.composite))
def test_a_misspelt_option_names_every_valid_one_in_one_line(name: str) -> None:
    with pytest.raises(ValueError) as err:
        apply_method(tiny(), name, kepp=0.5)
    message = str(err.value)
    assert "\n" not in message and f"{name}: unknown option 'kepp'" in message
    assert "valid options: " in message and "keep" in message.split("valid options: ")[1]
    assert "did you mean 'keep'?" in message


def test_foreign_options_are_refused_with_the_methods_own_names() -> None:
    with pytest.raises(ValueError, match=r"top: unknown option 'ratio'.*valid options: keep, layers, align"):
        apply_method(tiny(), "top", ratio=0.3)
    with pytest.raises(ValueError, match=r"rmeeto: unknown option 'rati' \(did you mean 'ratio'\?\)"):
        apply_method(tiny(), "rmeeto", rati=0.3)
    with pytest.raises(ValueError, match=r"keep \(alias keep_ratio, rho\).*layers \(alias pruning_layers\)"):
        apply_method(tiny(), "dyvm", keeep=0.7)


def test_dyvm_aliases_are_the_canonical_options() -> None:
    a = apply_method(tiny(), "dyvm", keep_ratio=0.6, pruning_layers=[1, 3]).reducer
    b = apply_method(tiny(), "dyvm", keep=0.6, layers=[1, 3]).reducer
    c = apply_method(tiny(), "dyvm", rho=0.6, layers=[1, 3]).reducer
    assert a.config == b.config == c.config
    assert a.pruning_layers == [1, 3] and a.token_ratios == pytest.approx([0.6, 0.36])
    assert not hasattr(a, "keep_ratio")  # one place holds the options: the config
    with pytest.raises(ValueError, match="give keep= or its alias keep_ratio=, not both"):
        apply_method(tiny(), "dyvm", keep=0.6, keep_ratio=0.6)
    with pytest.raises(ValueError, match=r"dyvm: keep \(keep_ratio, rho\) must be a fraction in \(0, 1\], got 1.5"):
        apply_method(tiny(), "dyvm", keep=1.5)


def test_rmeeto_keep_is_one_minus_the_papers_ratio_and_bad_values_are_refused() -> None:
    with torch.device("meta"):
        net = create_model("vim_small_patch16_224")
    assert apply_method(net, "rmeeto", keep=0.69).reducer.r == apply_method(net, "rmeeto", ratio=0.31).reducer.r == 11
    for opts, pattern in [({"ratio": "031"}, r"ratio \(the reduction ratio, 1 - keep\) must be a number in \[0, 1\), got '031'"),
                          (parse_method_options(["ratio=031"]), r"must be a number in \[0, 1\), got 25"),
                          ({"r": 1000}, r"r \(tokens merged per event\) must be an integer in 0..98"),
                          ({"keep": 0.7, "ratio": 0.3}, "give only one of keep="),
                          ({"cls_position": "left"}, "choose one of official, middle, boundary")]:
        with pytest.raises(ValueError, match=pattern):
            apply_method(net, "rmeeto", **opts)


def test_an_unknown_method_suggests_the_close_one() -> None:
    with pytest.raises(ValueError, match=r"unknown reduction method 'rmeto' \(did you mean 'rmeeto'\?\)"):
        apply_method(tiny(), "rmeto")
