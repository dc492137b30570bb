"""DyVM evaluation's grid agreement (mambatrim.engine.dyvm_eval, used by benchmarks/dyvm_cifar10.py): the share
of kept tokens on the coverage prior's grid, measured through the inference top-k, with the deployed model's own
accuracy."""
from __future__ import annotations

import copy

import torch

from mambatrim.engine import dyvm_eval
from mambatrim.models import create_model
from mambatrim.reduce import dyvm


def _model(prior: float) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = create_model("vim_tiny_patch16_224", depth=4, img_size=32, patch_size=4, stride=4, num_classes=10)
    model = dyvm.apply(copy.deepcopy(dense), keep_ratio=0.7, block_ratio=0.8, pruning_layers=[1, 2],
                       coverage_prior=prior)
    for predictor in model.reducer.predictors:  # a predictor with opinions of its own
        for p in predictor.parameters():
            torch.nn.init.normal_(p, std=0.1)
    return dyvm.deploy(model)


def test_grid_agreement_is_one_under_an_overwhelming_prior_and_below_one_without_it() -> None:
    torch.manual_seed(1)
    loader = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    cpu = torch.device("cpu")
    strong = _model(1000.0)
    agree = dyvm_eval.grid_agreement(strong, loader, cpu, amp=False)
    assert agree["on_grid_share"] == [1.0, 1.0]
    assert agree["top1"] == round(dyvm_eval.measure(strong, loader, cpu, amp=False)["top1"], 2)
    assert strong.reducer.keep_override is None  # restored
    weak = _model(0.01)
    agree = dyvm_eval.grid_agreement(weak, loader, cpu, amp=False)
    assert all(share < 0.95 for share in agree["on_grid_share"])
    # the pass decides as the deployed top-k does: identical logits
    images = loader[0][0]
    with torch.no_grad():
        deployed = weak(images)
        k = [int(r * weak.patch_embed.num_patches) for r in weak.reducer.token_ratios]
        weak.reducer.keep_override = lambda stage, lp, pol, _: dyvm_eval.inference_keep(lp, pol, k[stage])
        overridden = weak(images)
        weak.reducer.keep_override = None
    torch.testing.assert_close(overridden, deployed)
    assert dyvm_eval.grid_agreement(dyvm.deploy(dyvm.apply(create_model(
        "vim_tiny_patch16_224", depth=4, img_size=32, patch_size=4, stride=4, num_classes=10),
        pruning_layers=[1, 2])), loader, cpu, amp=False) is None  # no prior: nothing to compare with
