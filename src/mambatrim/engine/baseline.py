"""Fine-tuning from a dense baseline checkpoint: which of the baseline run's recorded settings carry over.

The CIFAR-10 protocols (``benchmarks/dyvm_cifar10.py``, ``benchmarks/cifar10/{top,rmeeto}.py``) start every
method from the same dense checkpoint written by ``mambatrim train``. Its model, data and augmentation settings
carry over into evaluation and fine-tuning; its run and optimiser settings do not (the method's recipe sets
them). One list, so the protocols cannot drift apart.
"""
from __future__ import annotations

from typing import Any

from .config import FIELDS

# settings of the baseline's run that must not carry over into evaluation or fine-tuning
RUN_KEYS = ("output_dir", "resume", "finetune", "teacher", "teacher_model", "method", "method_opts", "epochs",
            "lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "no_weight_decay", "unscale_lr",
            "stop_after_steps", "time_limit_s", "save_every_steps", "model_ema", "clip_grad", "accum_steps",
            "drop_path")


def baseline_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The dense run's recorded config (model, data, augmentation), minus its run and optimiser settings."""
    cfg = dict(checkpoint.get("config") or {})
    if not cfg.get("model"):
        raise ValueError("the checkpoint records no training config: pass a checkpoint written by mambatrim train")
    return {k: v for k, v in cfg.items() if k in FIELDS and k not in RUN_KEYS}


def baseline_shape(settings: dict[str, Any]) -> tuple[int, int, int]:
    """(tokens including the protected ones, depth, protected tokens) of the baseline's model at its training
    input size: what a method's schedule (R-MeeTo's r for a ratio, ToP's kept counts) is computed from."""
    import torch

    from ..models import create_model
    from .config import make_config
    from .train import model_kwargs

    cfg = make_config(settings)
    size = cfg.input_size or cfg.model_kwargs.get("img_size") or 224
    with torch.device("meta"):
        model = create_model(cfg.model, **model_kwargs(cfg, cfg.num_classes or 10, cfg.in_chans or 3, size))
    protected = int(getattr(model, "num_protected", 1))
    return model.patch_embed.num_patches + protected, int(model.depth), protected
