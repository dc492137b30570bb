"""One flat training config: dataclass defaults < YAML file (``--config``) < command-line options.

Defaults follow the official Vim/DeiT recipe (timm 0.4 weight-decay groups, cosine with warm-up, lr scaled by
global batch / 512), except where a small run needs otherwise (mixed precision on GPU by default).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._yaml import load_yaml_text
from ..data import DIGITS, MOVING_SHAPES, TASKS, DataOptions
from ..validation import check_all
from .losses import DISTILL_MODES
from .precision import canonical_dtype


@dataclass
class TrainConfig(DataOptions):
    # model
    model: str = "vim_tiny_patch16_224"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # overrides of the registered config (depth, ...)
    num_classes: int | None = None          # None: from the data
    drop_path: float = 0.1
    method: str | None = None               # a mambatrim.reduce.METHODS name attached to the student
    method_opts: dict[str, Any] = field(default_factory=dict)
    finetune: str | None = None             # initial weights (mismatched head skipped)
    # data: the fields of DataOptions (inherited), with training-run defaults where they differ
    in_chans: int | None = None             # None: the model's channels (3 unless model_kwargs say otherwise)
    batch_size: int = 128                   # per process
    num_workers: int = 8
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    # optimisation
    epochs: int = 300
    accum_steps: int = 1
    lr: float = 5e-4
    unscale_lr: bool = False                # True: use lr as given, not lr * global_batch / 512
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5
    weight_decay: float = 0.05
    # parameters exempt from weight decay: '1d' (ndim <= 1), 'bias', 'norm', 'pos_embed', 'cls_token', 'A_log',
    # 'D', 'model' (the model's no_weight_decay()). Default: timm 0.4 (official Vim): A_log IS decayed.
    no_weight_decay: list[str] = field(default_factory=lambda: ["1d", "bias", "model"])
    opt_eps: float = 1e-8
    opt_betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None
    amp: bool = True                        # autocast on CUDA (ignored on CPU)
    amp_dtype: str = "bf16"                 # bf16 | fp16 (fp16 uses a GradScaler); bfloat16 / float16 accepted
    model_ema: bool = False
    model_ema_decay: float = 0.99996
    # distillation
    teacher: str | None = None              # checkpoint of the frozen dense teacher
    teacher_model: str | None = None        # its architecture (default: --model with the same model_kwargs)
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # overrides of the teacher's constructor
    distill_mode: str = "kl"                # kl: KL on logits (+ token MSE); hard: CE(dist_head, teacher argmax)
    teacher_input_size: int | None = None   # hard: the teacher sees the batch resized to this side
    cls_weight: float = 1.0
    distill_weight: float = 0.5             # KL(teacher || student) on logits
    distill_temperature: float = 1.0
    token_distill_weight: float = 0.0       # MSE of final tokens vs the teacher's at the same positions
    teacher_cuda_graph: bool = True         # on a GPU, replay the teacher's forward from a CUDA graph
    cuda_graph: bool = True                 # on one GPU, replay the student's forward+backward from CUDA graphs
    # run
    output_dir: str | None = None
    existing_output: str = "refuse"         # an output_dir already holding a run: refuse | overwrite | new
    resume: str | None = None               # a checkpoint, or 'auto' (OUTPUT_DIR/last.pth if it exists)
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1                     # epochs
    save_every_steps: int = 0               # also write last.pth every N optimizer steps (0: per epoch only)
    stop_after_steps: int | None = None     # stop (checkpoint and exit) after this many optimizer steps in total
    dist_eval: bool = True
    find_unused_parameters: bool = False
    tensorboard: bool = False
    progress: bool = True
    time_limit_s: float | None = None       # stop training (checkpointed) once this much wall time has passed

    def data_options(self, in_chans: int) -> DataOptions:
        names = {f.name for f in dataclasses.fields(DataOptions)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names and v is not None}
        values["in_chans"] = in_chans
        return DataOptions(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = load_yaml_text(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def make_config(*layers: dict[str, Any]) -> TrainConfig:
    """Merge layers (later wins; ``None`` values are skipped) into a checked :class:`TrainConfig`."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            if key not in FIELDS:
                import difflib

                close = difflib.get_close_matches(key, FIELDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown training option {key!r}{hint}")
            if key in ("model_kwargs", "method_opts", "teacher_kwargs") and key in merged:
                value = {**merged[key], **value}
            merged[key] = value
    for key in ("opt_betas", "mean", "std"):
        if key in merged:
            merged[key] = tuple(merged[key])
    cfg = TrainConfig(**merged)
    check_config(cfg)
    return cfg


# every numeric option and its valid range (mambatrim.validation kinds)
RANGES: dict[str, str] = {
    "num_classes": "positive_int", "in_chans": "positive_int", "input_size": "positive_int",
    "batch_size": "positive_int", "eval_batch_size": "positive_int", "num_workers": "non_negative_int",
    "epochs": "positive_int", "accum_steps": "positive_int", "eval_every": "positive_int",
    "save_every_steps": "non_negative_int", "stop_after_steps": "positive_int", "repeated_aug": "positive_int",
    "recount": "non_negative_int", "gpu_aug_pad": "non_negative_int", "seed": "non_negative_int",
    "lr": "positive", "min_lr": "non_negative", "warmup_lr": "non_negative", "warmup_epochs": "non_negative",
    "weight_decay": "non_negative", "opt_eps": "positive", "clip_grad": "positive", "drop_path": "probability",
    "mixup": "non_negative", "cutmix": "non_negative", "mixup_prob": "probability",
    "mixup_switch_prob": "probability", "smoothing": "probability", "reprob": "probability",
    "color_jitter": "non_negative", "crop_pct": "fraction", "model_ema_decay": "probability",
    "cls_weight": "non_negative", "distill_weight": "non_negative", "distill_temperature": "positive",
    "token_distill_weight": "non_negative", "time_limit_s": "positive", "teacher_input_size": "positive_int",
    "num_frames": "positive_int", "test_clips": "positive_int", "test_crops": "positive_int",
    "video_min_scale": "fraction",
}
EXISTING_OUTPUT = ("refuse", "overwrite", "new")


def check_config(cfg: TrainConfig) -> None:
    """Refuse every out-of-range value with a one-line error naming the option (never replaced by a default)."""
    check_all(dataclasses.asdict(cfg), RANGES)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0 and cfg.batch_size % 2:
        raise ValueError(f"mixup/cutmix need an even per-process batch size, got {cfg.batch_size}")
    cfg.amp_dtype = canonical_dtype(cfg.amp_dtype, "amp_dtype")
    if cfg.amp_dtype == "fp32":
        raise ValueError("amp_dtype must be bf16 or fp16 (use --no-amp for fp32)")
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    frames = cfg.model_kwargs.get("num_frames")
    if cfg.task == "video" and frames is not None and frames != cfg.num_frames:
        raise ValueError(f"model_kwargs num_frames={frames} but the data samples num_frames={cfg.num_frames}: "
                         f"set num_frames only")
    if cfg.distill_mode not in DISTILL_MODES:
        raise ValueError(f"distill_mode must be one of {', '.join(DISTILL_MODES)}, got {cfg.distill_mode!r}")
    if cfg.existing_output not in EXISTING_OUTPUT:
        raise ValueError(f"existing_output must be one of {', '.join(EXISTING_OUTPUT)}, got {cfg.existing_output!r}")
    known = {"1d", "bias", "norm", "pos_embed", "cls_token", "A_log", "D", "model"}
    bad = [k for k in cfg.no_weight_decay if k not in known]
    if bad:
        raise ValueError(f"unknown no_weight_decay entries {bad}; known: {sorted(known)}")


def resolve_input(cfg: TrainConfig) -> tuple[int, int | None]:
    """(channels, input size or None = the data's own) from the config and the model config."""
    in_chans = cfg.in_chans or cfg.model_kwargs.get("channels") or cfg.model_kwargs.get("in_chans") or 3
    size = cfg.input_size or cfg.model_kwargs.get("img_size")
    if size is None and cfg.data_path not in (DIGITS, MOVING_SHAPES):
        size = 224
    return int(in_chans), size
