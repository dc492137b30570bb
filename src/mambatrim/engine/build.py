"""The one model builder: registered config + overrides, a reduction method, weights in the order they need.

Used by every command (``flops``, ``bench``, ``train``, ``eval``, ``demo``) and by the training loop, so a model
named on the command line and one named in a recipe are built the same way.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import create_model, load_checkpoint, resolve_name
from ..models.checkpoint import extract_state_dict, read_checkpoint


def build_model(name: str, method: str | None = None, method_opts: dict[str, Any] | None = None,
                weights: str | dict[str, Any] | None = None, use_ema: bool = False,
                skip_mismatched_head: bool = False, meta: bool = False, **model_kwargs: Any) -> nn.Module:
    """Create model ``name`` (close matches suggested for unknown names), attach ``method`` with ``method_opts``
    and load ``weights`` (a path or a checkpoint dict).

    A checkpoint holding method parameters (keys the dense model lacks: ``reducer.*``, or a method's released
    names that its key mapper renames) is loaded after the method is attached; a dense one before, so a method
    can start from dense weights. ``meta=True`` builds a dense, weightless model (FLOPs and parameter counts).
    """
    resolve_name(name)
    if method_opts and not method:
        raise ValueError(f"method options {sorted(method_opts)} given without a method")
    if meta:
        if method is not None or weights is not None:
            raise ValueError("meta=True builds a dense model without weights")
        with torch.device("meta"):
            return create_model(name, **model_kwargs)
    model = create_model(name, **model_kwargs)
    checkpoint = read_checkpoint(weights) if isinstance(weights, str) else weights
    method_weights = False
    if checkpoint is not None:
        sd, _ = extract_state_dict(checkpoint, use_ema=use_ema)
        dense_keys = set(model.state_dict())
        method_weights = any(k not in dense_keys for k in sd)
        if not method_weights:
            load_checkpoint(model, checkpoint, use_ema=use_ema, skip_mismatched_head=skip_mismatched_head)
    if method:
        from ..reduce import apply_method  # noqa: PLC0415 (imports every method)

        model = apply_method(model, method, **(method_opts or {}))
    if checkpoint is not None and method_weights:
        load_checkpoint(model, checkpoint, use_ema=use_ema, skip_mismatched_head=skip_mismatched_head)
    return model


def model_kwargs(cfg: Any, num_classes: int, in_chans: int, img_size: int) -> dict[str, Any]:
    """The ``create_model`` overrides of a training config, for data with these classes, channels and size."""
    kwargs = {"drop_path_rate": cfg.drop_path, **cfg.model_kwargs}
    kwargs.update(num_classes=num_classes, channels=in_chans, img_size=img_size)
    kwargs.pop("in_chans", None)
    if getattr(cfg, "task", "image") == "video":  # a video model sees the clips the data samples
        kwargs["num_frames"] = cfg.num_frames
    return kwargs


def build_from_config(cfg: Any, num_classes: int, in_chans: int, img_size: int,
                      weights: str | dict[str, Any] | None = None, use_ema: bool = False,
                      skip_mismatched_head: bool = False) -> nn.Module:
    """:func:`build_model` with the model, method and overrides of a training config."""
    return build_model(cfg.model, cfg.method, cfg.method_opts, weights, use_ema=use_ema,
                       skip_mismatched_head=skip_mismatched_head,
                       **model_kwargs(cfg, num_classes, in_chans, img_size))
