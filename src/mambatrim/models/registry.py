"""Model configs of every backbone family, registered with timm so ``timm.create_model(name)`` works after
``import mambatrim``; official registration names that differ from ours are aliases.

Adding a backbone is its model file plus one :func:`register_family` call below: the config table, the official
aliases and the published weights. Overrides passed to ``create_model`` replace config entries by their official
constructor names (``depth``, ``embed_dim``, ``num_classes``, ``img_size``, ...).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import timm
from timm.models import register_model
from torch import nn

from .checkpoint import load_checkpoint
from .groupmamba import GroupMamba
from .mambareg import MambaReg
from .plainmamba import PlainMamba
from .videomamba import VideoMamba, VideoMambaVideo
from .vim import VisionMamba

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelEntry:
    """One registered config: its family, the class that builds it, the constructor arguments it fixes, and
    the pretrained-config fields timm reads (``first_conv``, ``classifier``, weights on the hub)."""

    name: str
    family: str
    cls: Callable[..., nn.Module]
    config: dict[str, Any]
    first_conv: str = "patch_embed.proj"
    classifier: str = "head"
    hf_weights: tuple[str, str] | None = None
    input_size: tuple[int, ...] = (3, 224, 224)
    extra_cfg: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelEntry] = {}
OFFICIAL_ALIASES: dict[str, str] = {}
MODEL_CONFIGS: dict[str, dict[str, Any]] = {}  # name -> the constructor arguments its config fixes


def register_family(family: str, cls: Callable[..., nn.Module], configs: dict[str, dict[str, Any]],
                    aliases: dict[str, str] | None = None,
                    hf_weights: dict[str, tuple[str, str]] | None = None, **entry_fields: Any) -> None:
    """Register ``configs`` (name -> constructor arguments) of one backbone family with timm, plus ``aliases``
    (official name -> our name) and published ``hf_weights`` (name -> (hub repo, file name))."""
    for name, config in configs.items():
        if name in MODELS or name in OFFICIAL_ALIASES:
            raise ValueError(f"model name {name!r} is registered twice")
        MODELS[name] = ModelEntry(name, family, cls, dict(config),
                                  hf_weights=(hf_weights or {}).get(name), **entry_fields)
        MODEL_CONFIGS[name] = MODELS[name].config
        register_model(_entrypoint(name, name))
    for alias, target in (aliases or {}).items():
        if target not in MODELS:
            raise ValueError(f"alias {alias!r} points at unregistered model {target!r}")
        OFFICIAL_ALIASES[alias] = target
        register_model(_entrypoint(alias, target))


def pretrained_cfg_for(name: str) -> dict[str, Any]:
    entry = MODELS[name]
    hub = entry.hf_weights
    return dict(
        architecture=name, num_classes=1000, input_size=entry.input_size, crop_pct=0.875,
        interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv=entry.first_conv,
        classifier=entry.classifier, hf_hub_id=hub[0] if hub else None, hf_hub_filename=hub[1] if hub else None,
        **entry.extra_cfg,
    )


def _resolve_pretrained_file(name: str, overlay: dict[str, Any] | None) -> str:
    if overlay and overlay.get("file"):
        return str(overlay["file"])
    hub = MODELS[name].hf_weights
    if hub is None:
        raise ValueError(f"no published weights are known for {name}: pass "
                         f"pretrained_cfg_overlay=dict(file='path/to/checkpoint.pth')")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise RuntimeError("pretrained=True needs huggingface_hub to download weights; or pass "
                           "pretrained_cfg_overlay=dict(file=...)") from err
    try:
        return hf_hub_download(hub[0], hub[1])
    except Exception as err:  # network, auth, missing file: all end the same way for the user
        raise RuntimeError(f"could not download {hub[1]} from {hub[0]} ({err}); download it yourself and pass "
                           f"pretrained_cfg_overlay=dict(file=...)") from err


def build(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered config; ``kwargs`` override the config as in timm."""
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("cache_dir", None)
    entry = MODELS[name]
    model = entry.cls(**{**entry.config, **kwargs})
    cfg = pretrained_cfg_for(name)
    input_size = getattr(model, "input_size", None)
    if input_size is not None:
        cfg["input_size"] = tuple(input_size)
    cfg["num_classes"] = getattr(model, "num_classes", cfg["num_classes"])
    model.pretrained_cfg = model.default_cfg = cfg  # type: ignore[assignment]
    if pretrained:
        load_checkpoint(model, _resolve_pretrained_file(name, overlay),
                        skip_mismatched_head=cfg["num_classes"] != 1000)
    return model


def _entrypoint(registered: str, config: str) -> Callable[..., nn.Module]:
    def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build(config, pretrained=pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = registered
    fn.__doc__ = f"{MODELS[config].family} config {config!r}."
    fn.__module__ = __name__
    return fn


def list_models(family: str | None = None) -> list[str]:
    """Registered config names (of one family if given), in registration order."""
    return [name for name, entry in MODELS.items() if family is None or entry.family == family]


def resolve_name(name: str) -> str:
    """Canonical config name for a registered name or alias; unknown names suggest close matches."""
    if name in MODELS:
        return name
    if name in OFFICIAL_ALIASES:
        return OFFICIAL_ALIASES[name]
    close = difflib.get_close_matches(name, list(MODELS) + list(OFFICIAL_ALIASES), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Known models: {', '.join(MODELS)}."
    raise ValueError(f"unknown model {name!r}.{hint}")


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a helpful error for unknown names."""
    resolve_name(name)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


# ---------------------------------------------------------------------------------------------- the families
register_family(
    "Vim", VisionMamba,
    {
        "vim_tiny_patch16_224": dict(embed_dim=192, patch_size=16, stride=16, depth=24),
        "vim_tiny_patch16_stride8_224": dict(embed_dim=192, patch_size=16, stride=8, depth=24),
        "vim_small_patch16_224": dict(embed_dim=384, patch_size=16, stride=16, depth=24),
        "vim_small_patch16_stride8_224": dict(embed_dim=384, patch_size=16, stride=8, depth=24),
        "vim_base_patch16_224": dict(embed_dim=768, patch_size=16, stride=16, depth=24),
    },
    aliases={
        "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_patch16_224",
        "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2":
            "vim_tiny_patch16_stride8_224",
        "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2":
            "vim_small_patch16_224",
        "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2":
            "vim_small_patch16_stride8_224",
        "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2":
            "vim_base_patch16_224",
    },
    # official weights on the Hugging Face hub (file names as published for the Vim-Ti / Vim-S releases)
    hf_weights={
        "vim_tiny_patch16_224": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
        "vim_small_patch16_224": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    },
)

register_family(
    "PlainMamba", PlainMamba,
    {
        "plainmamba_l1": dict(embed_dim=192, depth=24, num_convs_patch_embed=1, layers_with_dwconv=(0,),
                              drop_path_rate=0.2),
        "plainmamba_l2": dict(embed_dim=384, depth=24, num_convs_patch_embed=2, drop_path_rate=0.2),
        "plainmamba_l3": dict(embed_dim=448, depth=36, num_convs_patch_embed=2, drop_path_rate=0.4),
    },
    # the official mmcls checkpoints (README of ChenhongyiYang/PlainMamba)
    hf_weights={f"plainmamba_{v}": ("ChenhongyiYang/PlainMamba", f"{v}.pth") for v in ("l1", "l2", "l3")},
    first_conv="backbone.patch_embed.stem.0", classifier="head.fc",
)

register_family(
    "MambaReg", MambaReg,
    {
        "mambar_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=24, num_cls_tokens=12, cls_reduce=1),
        "mambar_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=24, num_cls_tokens=12, cls_reduce=2),
        "mambar_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=24, num_cls_tokens=12, cls_reduce=4),
        "mambar_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=48, num_cls_tokens=16, cls_reduce=8),
    },
    hf_weights={name: ("Wangf3014/Mamba-Reg", f"{name}.pth")
                for name in ("mambar_small_patch16_224", "mambar_base_patch16_224", "mambar_large_patch16_224")},
)

register_family(
    "VideoMamba", VideoMamba,
    {
        "videomamba_tiny": dict(patch_size=16, embed_dim=192, depth=24),
        "videomamba_small": dict(patch_size=16, embed_dim=384, depth=24),
        "videomamba_middle": dict(patch_size=16, embed_dim=576, depth=32),
        "videomamba_base": dict(patch_size=16, embed_dim=768, depth=24),
        "videomamba_middle_distill": dict(patch_size=16, embed_dim=576, depth=32, distill=True),
        "videomamba_base_distill": dict(patch_size=16, embed_dim=768, depth=24, distill=True),
    },
    # the ImageNet-1k 224 px releases (the middle and base ones come from the self-distillation runs)
    hf_weights={
        "videomamba_tiny": ("OpenGVLab/VideoMamba", "videomamba_t16_in1k_res224.pth"),
        "videomamba_small": ("OpenGVLab/VideoMamba", "videomamba_s16_in1k_res224.pth"),
        "videomamba_middle_distill": ("OpenGVLab/VideoMamba", "videomamba_m16_in1k_res224.pth"),
        "videomamba_base_distill": ("OpenGVLab/VideoMamba", "videomamba_b16_in1k_res224.pth"),
    },
)

# The video models (official video_sm): registered there as videomamba_tiny / _small / _middle, names the image
# models own here, hence no aliases. Constructor arguments num_frames (8), kernel_size (tubelet, 1), img_size.
register_family(
    "VideoMambaVideo", VideoMambaVideo,
    {
        "videomamba_video_tiny": dict(patch_size=16, embed_dim=192, depth=24),
        "videomamba_video_small": dict(patch_size=16, embed_dim=384, depth=24),
        "videomamba_video_middle": dict(patch_size=16, embed_dim=576, depth=32),
    },
)

register_family(
    "GroupMamba", GroupMamba,
    {
        "groupmamba_tiny": dict(stem_hidden_dim=32, embed_dims=[64, 128, 348, 448], mlp_ratios=[8, 8, 4, 4],
                                depths=[3, 4, 9, 3], norm_eps=1e-6),
        "groupmamba_small": dict(stem_hidden_dim=64, embed_dims=[64, 128, 348, 512], mlp_ratios=[8, 8, 4, 4],
                                 depths=[3, 4, 16, 3], norm_eps=1e-6),
        "groupmamba_base": dict(stem_hidden_dim=64, embed_dims=[96, 192, 424, 512], mlp_ratios=[8, 8, 4, 4],
                                depths=[3, 6, 21, 3], norm_eps=1e-6),
    },
    first_conv="patch_embed1.conv.0",
)
