"""VideoMamba video models against the official video_sm structure and forward rules.

The reference embedding below follows the official forward literally (Conv3d, frames folded into the batch for
the spatial embedding, the class token taken from the first row, then patches regrouped per location for the
temporal embedding); the blocks are the independent reference of the image-model tests.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

import mambatrim  # noqa: F401 (registers the models)
from conftest import FIXTURES
from mambatrim.models import list_models, load_checkpoint
from test_models_mambareg_videomamba import blocks_ref, randomised, resample_grid

SMALL = dict(depth=2, embed_dim=24, num_classes=5, img_size=32, patch_size=8, num_frames=4, drop_path_rate=0.0)


def official() -> dict:
    return json.loads((FIXTURES / "videomamba_video_keys.json").read_text())


@pytest.mark.parametrize("name", list_models("VideoMambaVideo"))
def test_state_dict_matches_official_keys_and_shapes(name):
    ref = official()
    with torch.device("meta"):
        model = timm.create_model(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v) for k, v in
                                                                         ref["configs"][name]}
    assert sum(p.numel() for p in model.parameters()) == ref["params"][name]


def test_tiny_has_the_published_parameter_count_and_takes_official_overrides():
    with torch.device("meta"):
        assert sum(p.numel() for p in timm.create_model("videomamba_video_tiny").parameters()) == 7_149_544
    model = timm.create_model("videomamba_video_tiny", embed_dim=96, depth=2, num_classes=10, img_size=64,
                              num_frames=4, kernel_size=1)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["pos_embed"] == (1, 17, 96) and shapes["temporal_pos_embedding"] == (1, 4, 96)
    assert shapes["patch_embed.proj.weight"] == (96, 3, 1, 16, 16) and shapes["head.weight"] == (10, 96)
    assert len(model.layers) == 2 and model.input_size == (3, 4, 64, 64)
    tubelet = timm.create_model("videomamba_video_tiny", depth=1, num_frames=8, kernel_size=2)
    assert tubelet.temporal_pos_embedding.shape == (1, 4, 192)
    assert tubelet.patch_embed.proj.weight.shape == (192, 3, 2, 16, 16)
    assert {"temporal_pos_embedding", "pos_embed", "cls_token"} <= model.no_weight_decay()


def test_bad_inputs_are_explained():
    model = timm.create_model("videomamba_video_tiny", **SMALL)
    with pytest.raises(ValueError, match=r"expected clips of shape \(batch, channels, frames, height, width\)"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="num_frames=5 must be a multiple of the tubelet length kernel_size=2"):
        timm.create_model("videomamba_video_tiny", depth=1, num_frames=5, kernel_size=2)
    with pytest.raises(ValueError, match="clip height 30 is not a multiple of the tubelet's 8"):
        model(torch.randn(1, 3, 4, 30, 32))


def embed_ref(p: dict, clip: torch.Tensor, cfg: dict, kernel: int = 1) -> torch.Tensor:
    """The official embedding: Conv3d; (B*T, HW, D) rows get cls + pos_embed; cls from the first row; patches
    regrouped per location (B*HW, T, D) get the temporal embedding; [cls, frame-major patches]."""
    x = F.conv3d(clip, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"],
                 stride=(kernel, cfg["patch_size"], cfg["patch_size"]))
    bsz, dim, frames, height, width = x.shape
    x = x.permute(0, 2, 3, 4, 1).reshape(bsz * frames, height * width, dim)
    x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), x], 1) + p["pos_embed"]
    cls = x[:bsz, :1]
    x = x[:, 1:].reshape(bsz, frames, height * width, dim).transpose(1, 2).reshape(bsz * height * width, frames, dim)
    x = x + p["temporal_pos_embedding"]
    x = x.reshape(bsz, height * width, frames, dim).transpose(1, 2).reshape(bsz, frames * height * width, dim)
    return torch.cat([cls, x], 1)


@pytest.mark.parametrize("kernel", [1, 2])
def test_logits_and_layer0_inputs_match_the_independent_official_forward(kernel):
    cfg = dict(SMALL, kernel_size=kernel)
    model = randomised("videomamba_video_tiny", cfg)
    clip = torch.randn(2, 3, 4, 32, 32)
    seen = []
    model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        ours = model(clip)
        params = {k: v.double() for k, v in model.state_dict().items()}
        seq = embed_ref(params, clip.double(), cfg, kernel)
        expected = (blocks_ref(params, seq, cfg["depth"], divide=False)[:, 0] @ params["head.weight"].T
                    + params["head.bias"])
    assert seq.shape == (2, 1 + 4 // kernel * 16, 24)
    torch.testing.assert_close(seen[0].double(), seq, rtol=1e-5, atol=1e-5)  # layer 0 sees the embedding
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)
    # the temporal embedding matters to the patches and never reaches the class token
    with torch.no_grad():
        model.temporal_pos_embedding.zero_()
        plain = model.embed(clip).hidden
    assert torch.equal(plain[:, 0], seen[0][:, 0]) and not torch.allclose(plain[:, 1:], seen[0][:, 1:])


def test_checkpoints_load_strictly_and_resize_space_and_time():
    source = randomised("videomamba_video_tiny", SMALL, seed=1)
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    report = load_checkpoint(timm.create_model("videomamba_video_tiny", **SMALL), {"model": sd})
    assert not report.resized
    target = timm.create_model("videomamba_video_tiny", **dict(SMALL, num_frames=8, img_size=48))
    report = load_checkpoint(target, {"model": {k: v.clone() for k, v in sd.items()}})
    assert len(report.resized) == 2
    temporal = sd["temporal_pos_embedding"].transpose(1, 2)  # official: linear, align_corners False
    expected = F.interpolate(temporal, size=8, mode="linear", align_corners=False).transpose(1, 2)
    torch.testing.assert_close(target.temporal_pos_embedding.detach(), expected)
    torch.testing.assert_close(target.pos_embed.detach()[:, 1:], resample_grid(sd["pos_embed"][:, 1:], 4, 6))
    with torch.no_grad():
        assert target(torch.randn(1, 3, 8, 48, 48)).shape == (1, 5)


def test_an_image_checkpoint_inflates_to_the_video_model():
    """The official video fine-tuning start: Conv2d patch weights inflated at the centre frame, temporal
    embedding zero. A one-frame clip then gives exactly the image model's logits."""
    image_cfg = {k: v for k, v in SMALL.items() if k != "num_frames"}
    image = randomised("videomamba_tiny", dict(image_cfg, stride=8), seed=2)
    video = timm.create_model("videomamba_video_tiny", **dict(SMALL, num_frames=1))
    report = load_checkpoint(video, {"model": {k: v.clone() for k, v in image.state_dict().items()}})
    assert any("inflated" in line for line in report.resized) and not video.temporal_pos_embedding.any()
    frame = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(video.eval()(frame[:, :, None]), image(frame), rtol=1e-5, atol=1e-5)
    tubelet = timm.create_model("videomamba_video_tiny", **dict(SMALL, kernel_size=2))
    load_checkpoint(tubelet, {"model": {k: v.clone() for k, v in image.state_dict().items()}})
    weight = tubelet.patch_embed.proj.weight.detach()
    assert torch.equal(weight[:, :, 1], image.patch_embed.proj.weight.detach()) and not weight[:, :, 0].any()


def test_flops_one_direction_reproduces_the_rmeeto_k400_baselines():
    """R-MeeTo's K400 table counts VideoMamba at 8 x 224 with Vim's one-direction rule: 11.54 / 40.43 / 115.33 G;
    that is the mean of our 'paper' (VideoMamba's fvcore rule, scan uncounted) and 'full' (both directions)."""
    from mambatrim.analysis import count_flops

    for name, published in [("videomamba_video_tiny", 11.54), ("videomamba_video_small", 40.43),
                            ("videomamba_video_middle", 115.33)]:
        with torch.device("meta"):
            report = count_flops(timm.create_model(name))
        assert report.tokens_per_layer[0] == 1569
        one_direction = (report.gflops("paper") + report.gflops("full")) / 2
        assert one_direction == pytest.approx(published, abs=0.01), name


METHODS = [("rmeeto", dict(ratio=0.2)), ("dyvm", dict(keep=0.7)), ("top", dict(keep=0.8, layers=[1, 3])),
           ("prune_random", dict(keep=0.8, layers=[1, 3]))]


@pytest.mark.parametrize("method,opts", METHODS)
def test_methods_apply_to_clips_keep_the_class_token_first_and_cut_flops(method, opts):
    from mambatrim.analysis import count_flops
    from mambatrim.reduce import apply_method

    cfg = dict(SMALL, depth=6)
    dense_flops = count_flops(randomised("videomamba_video_tiny", cfg))
    model = apply_method(randomised("videomamba_video_tiny", cfg), method, **opts)
    clip = torch.randn(2, 3, 4, 32, 32)
    for training in (False, True):
        model.train(training)
        with torch.set_grad_enabled(training):
            state = model.forward_tokens(clip)
            logits = model(clip)
        assert logits.shape == (2, 5) and torch.isfinite(logits).all()
        assert state.num_tokens < 65 or state.mask is not None
        assert torch.equal(state.protected, torch.zeros_like(state.protected))  # the class token stays first ...
        assert not state.positions[:, 0].any()  # ... and is the original token 0
    report = count_flops(model.eval())
    assert report.tokens_per_layer[0] == 65 and report.tokens_per_layer[-1] < 65
    assert report.gflops("full") < dense_flops.gflops("full")
