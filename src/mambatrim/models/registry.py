"""Model configs, registered with timm so ``timm.create_model('vim_tiny_patch16_224')`` works after
``import mambatrim``; the official long registration names are aliases."""
from __future__ import annotations

import difflib
from typing import Any, Callable

import timm
from timm.models import register_model

from .checkpoint import load_checkpoint
from .vim import VisionMamba

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "vim_tiny_patch16_224": dict(embed_dim=192, patch_size=16, stride=16, depth=24),
    "vim_tiny_patch16_stride8_224": dict(embed_dim=192, patch_size=16, stride=8, depth=24),
    "vim_small_patch16_224": dict(embed_dim=384, patch_size=16, stride=16, depth=24),
    "vim_small_patch16_stride8_224": dict(embed_dim=384, patch_size=16, stride=8, depth=24),
    "vim_base_patch16_224": dict(embed_dim=768, patch_size=16, stride=16, depth=24),
}

OFFICIAL_ALIASES: dict[str, str] = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_patch16_224",
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2":
        "vim_tiny_patch16_stride8_224",
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small_patch16_224",
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2":
        "vim_small_patch16_stride8_224",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2":
        "vim_base_patch16_224",
}

# Official weights on the Hugging Face hub (file names as published for the Vim-Ti / Vim-S releases).
HF_WEIGHTS: dict[str, tuple[str, str]] = {
    "vim_tiny_patch16_224": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_small_patch16_224": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
}


def pretrained_cfg_for(name: str) -> dict[str, Any]:
    hub = HF_WEIGHTS.get(name)
    return dict(
        architecture=name, num_classes=1000, input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="patch_embed.proj", classifier="head",
        hf_hub_id=hub[0] if hub else None, hf_hub_filename=hub[1] if hub else None,
    )


def _resolve_pretrained_file(name: str, overlay: dict[str, Any] | None) -> str:
    if overlay and overlay.get("file"):
        return str(overlay["file"])
    hub = HF_WEIGHTS.get(name)
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


def build_vim(name: str, pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Build a registered Vim config; ``kwargs`` override the config as in timm."""
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("cache_dir", None)
    cfg = {**MODEL_CONFIGS[name], **kwargs}
    model = VisionMamba(**cfg)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg_for(name)  # type: ignore[assignment]
    model.pretrained_cfg["input_size"] = (model.patch_embed.in_chans, model.patch_embed.img_size,
                                          model.patch_embed.img_size)
    model.pretrained_cfg["num_classes"] = model.num_classes
    if pretrained:
        load_checkpoint(model, _resolve_pretrained_file(name, overlay),
                        skip_mismatched_head=model.num_classes != 1000)
    return model


def _entrypoint(registered: str, config: str) -> Callable[..., VisionMamba]:
    def fn(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
        return build_vim(config, pretrained=pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = registered
    fn.__doc__ = f"Vision Mamba config {config!r}."
    fn.__module__ = __name__
    return fn


for _name in MODEL_CONFIGS:
    globals()[_name] = register_model(_entrypoint(_name, _name))
for _alias, _target in OFFICIAL_ALIASES.items():
    globals()[_alias] = register_model(_entrypoint(_alias, _target))


def list_models() -> list[str]:
    return list(MODEL_CONFIGS)


def resolve_name(name: str) -> str:
    """Canonical config name for a registered name or alias; unknown names suggest close matches."""
    if name in MODEL_CONFIGS:
        return name
    if name in OFFICIAL_ALIASES:
        return OFFICIAL_ALIASES[name]
    close = difflib.get_close_matches(name, list(MODEL_CONFIGS) + list(OFFICIAL_ALIASES), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Known models: {', '.join(MODEL_CONFIGS)}."
    raise ValueError(f"unknown model {name!r}.{hint}")


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """``timm.create_model`` with a helpful error for unknown names."""
    resolve_name(name)
    return timm.create_model(name, pretrained=pretrained, **kwargs)
