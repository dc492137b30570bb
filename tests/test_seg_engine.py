"""Segmentation engine: slide inference, layer-wise lr decay, a tiny training run with checkpoint and resume."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mambatrim.engine.segmentation import (SegConfig, build_segmenter, layer_decay_groups, load_seg_config,
                                           slide_logits, train_segmentation)

TINY = dict(depth=4, embed_dim=32, patch_size=8, stride=8)


def test_slide_inference_equals_whole_image_for_a_local_model() -> None:
    """A 1x1 conv gives every pixel the same logits in any window, so the window average must reproduce the
    whole-image output exactly (overlaps counted right, the last window flush with the border)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    image = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(conv, image, 4, crop=32, stride=20), conv(image))
        torch.testing.assert_close(slide_logits(conv, image[:, :, :24, :24], 4, crop=32, stride=20),
                                   conv(image[:, :, :24, :24]))  # smaller than the crop: padded, cut back


def test_layer_decay_groups() -> None:
    cfg = SegConfig(model_kwargs=TINY, out_indices=[0, 1, 2, 3], head_channels=8, crop=32)
    model = build_segmenter(cfg, 3)
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.01, decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # depth 4: embeddings layer 0 -> 0.5**5, block i -> 0.5**(4 - i), head -> 1
    assert lr_of[id(named["backbone.pos_embed"])] == 0.5 ** 5 and wd_of[id(named["backbone.pos_embed"])] == 0
    assert lr_of[id(named["backbone.layers.3.mixer.in_proj.weight"])] == 0.5
    assert lr_of[id(named["backbone.layers.0.mixer.in_proj.weight"])] == 0.5 ** 4
    assert lr_of[id(named["decode_head.classifier.weight"])] == 1.0
    assert wd_of[id(named["decode_head.classifier.weight"])] == 0.01
    assert wd_of[id(named["decode_head.classifier.bias"])] == 0.0
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)


def test_config_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown segmentation config keys \\['itres'\\]; valid keys: .*iters"):
        load_seg_config(None, {"itres": 3})
    with pytest.raises(ValueError, match="layer_decay must lie in \\(0, 1\\]"):
        SegConfig(layer_decay=1.5)


def test_train_checkpoint_and_resume(tmp_path) -> None:
    from mambatrim.data.segmentation import bundled_root

    data = bundled_root(size=32, train=4, val=2, folder=tmp_path / "data")
    common = dict(model_kwargs=TINY, out_indices=[0, 1, 2, 3], head_channels=8, data_path=str(data), crop=32,
                  scale=[64, 32], batch_size=2, num_workers=0, warmup_iters=1, lr=1e-3, dtype="fp32",
                  log_interval=1, num_classes=14, output_dir=str(tmp_path / "run"),
                  slide_stride=16, method="dyvm", method_opts={"keep": 0.8, "block_ratio": 0.8, "layers": [2]})
    first = train_segmentation(SegConfig(iters=2, eval_interval=2, **common))
    assert [e["iter"] for e in first["evals"]] == [2] and 0 <= first["final"]["mIoU"] <= 1
    assert {"ce", "aux_ce", "dyvm_token_ratio", "dyvm_block_ratio"} <= set(first["train_log"][0])
    ckpt = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert ckpt["iteration"] == 2 and ckpt["task"] == "segmentation"
    resumed = train_segmentation(SegConfig(iters=3, eval_interval=3, **common), resume="auto")
    assert [row["iter"] for row in resumed["train_log"]] == [3]
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["iteration"] == 3


def test_cli_segmentation_train_then_eval_with_a_method(tmp_path, capsys) -> None:
    import json

    from mambatrim.cli import main
    from mambatrim.data.segmentation import bundled_root

    data = bundled_root(size=32, train=2, val=1, folder=tmp_path / "data")
    tiny = ["--model-opt", "depth=4", "--model-opt", "embed_dim=32", "--model-opt", "patch_size=8",
            "--model-opt", "stride=8", "--set", "out_indices=[0,1,2,3]"]
    run = ["--task", "segmentation", "--data-path", str(data), "--input-size", "32", "--batch-size", "2",
           "--num-workers", "0", "--device", "cpu", "--set", "scale=[64,32]", "--set", "slide_stride=16",
           "--set", "num_classes=14"]
    assert main(["train", *run, *tiny, "--output-dir", str(tmp_path / "run"), "--set", "iters=1",
                 "--set", "eval_interval=1"]) == 0
    assert "done: mIoU" in capsys.readouterr().out
    out = tmp_path / "eval.json"
    assert main(["eval", "--task", "segmentation", "--checkpoint", str(tmp_path / "run" / "last.pth"),
                 "--method", "rmeeto", "--method-opt", "r=2", "--method-opt", "layers=[1,2]", "--json",
                 str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "rmeeto" and 0 <= result["mIoU"] <= 1 and len(result["IoU"]) == 14
    assert 0 < result["backbone_gflops"] and 0 < result["head_gflops"]


def test_cli_refuses_classification_options(capsys) -> None:
    from mambatrim.cli import main

    assert main(["train", "--task", "segmentation", "--mixup", "0.5"]) == 2
    assert "--task segmentation does not use --mixup; its options: --model" in capsys.readouterr().err


RECIPES = {  # file: (backbone, lr, per-GPU batch, UperNet width, DyVM rho or None)
    "seg_upernet_vim_t.yaml": ("vim_tiny_patch16_224", 6e-5, 8, 192, None),
    "seg_upernet_vim_s.yaml": ("vim_small_patch16_224", 12e-5, 16, 384, None),
    "seg_dyvm_vim_t.yaml": ("vim_tiny_patch16_224", 6e-5, 8, 192, 0.9),
    "seg_dyvm_vim_s.yaml": ("vim_small_patch16_224", 12e-5, 16, 384, 0.8),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_are_the_authors(name: str) -> None:
    from pathlib import Path

    from mambatrim.reduce import apply_method
    from mambatrim.models.segmentation import create_segmentation_model

    cfg = load_seg_config(str(Path(__file__).parents[1] / "configs" / name))
    backbone, lr, batch, width, rho = RECIPES[name]
    assert (cfg.backbone, cfg.lr, cfg.batch_size, cfg.head_channels) == (backbone, pytest.approx(lr), batch, width)
    assert (cfg.crop, cfg.slide_stride, cfg.iters, cfg.warmup_iters) == (512, 341, 80000, 1500)
    assert (cfg.weight_decay, cfg.layer_decay, cfg.clip_grad, cfg.out_indices) == (0.01, 0.92, 5.0, [5, 11, 17, 23])
    assert not cfg.class_token
    if rho is None:
        assert cfg.method is None
        return
    assert cfg.method == "dyvm" and cfg.method_opts["keep"] == rho and cfg.method_opts["block_ratio"] == 0.8
    assert (cfg.method_opts["token_loss_weight"], cfg.method_opts["block_loss_weight"]) == (20.0, 20.0)
    assert cfg.method_opts["distill_weight"] == 0.0
    tiny = create_segmentation_model("vim_tiny_patch16_224", img_size=32, out_indices=(5, 11, 17, 23), depth=24,
                                     embed_dim=16, patch_size=8, stride=8)
    reducer = apply_method(tiny.backbone, cfg.method, **cfg.method_opts).reducer  # the options are DyVM's
    assert reducer.token_loss_weight == 20.0 and reducer.pruning_layers == [6, 12, 18]


def test_output_folder_with_a_run_is_not_overwritten(tmp_path) -> None:
    from mambatrim.engine.segmentation import _resume_path

    (tmp_path / "last.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds a run \\(last.pth\\): continue it with --resume auto"):
        _resume_path(tmp_path, None)
    assert _resume_path(tmp_path, "auto") == tmp_path / "last.pth"
    assert _resume_path(tmp_path / "new", "auto") is None
    with pytest.raises(FileNotFoundError, match="--resume .*missing.pth: no such checkpoint"):
        _resume_path(tmp_path, str(tmp_path / "missing.pth"))
