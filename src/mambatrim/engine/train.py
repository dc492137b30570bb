"""The one training loop: DeiT/Vim recipe, distillation, gradient accumulation, DDP, exact resume.

``train(cfg)`` runs a whole job from a :class:`~mambatrim.engine.config.TrainConfig` and returns the summary
dict (also written to ``OUTPUT_DIR/summary.json``). Launch under ``torchrun`` for DDP: the process group is
joined from the environment. Rank 0 alone logs and writes checkpoints.

Exact resume: the checkpoint holds model, optimizer, scheduler, scaler, EMA, epoch, optimizer steps done in
that epoch and every rank's RNG states. Sample order depends only on (seed, epoch) and the data skips the
samples already consumed, so a resumed run continues with the batches and random draws of the uninterrupted
one (bit-exact on CPU with the in-memory data path or deterministic transforms).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import yaml
from torch import nn

from ..data import DIGITS, build_data
from ..models import OFFICIAL_ALIASES, MODELS, create_model, load_checkpoint
from ..models.checkpoint import read_checkpoint
from .build import build_from_config, model_kwargs
from .checkpointing import atomic_save, capture_rng_state, restore_rng_state
from .config import TrainConfig, resolve_input
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed
from .evaluate import evaluate
from .precision import autocast, torch_dtype
from .losses import LossWeights, StudentForward, TrainingLoss, check_teacher
from .optim import build_optimizer, build_scheduler, scaled_lr
from .report import MetricsLog, write_json


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, writes ``last.pth`` and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequested":
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_teacher(cfg: TrainConfig, student: nn.Module, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """Frozen dense teacher in eval mode; a checkpoint or architecture that does not fit is refused.

    'kl' mode: the student's architecture (or ``teacher_model``) with the student's overrides. 'hard' mode: any
    timm classifier ``teacher_model`` (a CNN, RegNetY-160, one of ours) with ``teacher_kwargs``."""
    name = cfg.teacher_model or cfg.model
    if cfg.distill_mode == "hard" and name != cfg.model:
        kwargs = {"num_classes": num_classes, "in_chans": in_chans}
        if name in MODELS or name in OFFICIAL_ALIASES:  # ours take the input size; timm's CNNs do not
            kwargs["img_size"] = img_size
        try:
            teacher = timm.create_model(name, **{**kwargs, **cfg.teacher_kwargs})
        except RuntimeError as err:  # timm's 'Unknown model'
            raise ValueError(f"unknown teacher model {name!r}: {err}") from err
    else:
        kwargs = {**model_kwargs(cfg, num_classes, in_chans, img_size), **cfg.teacher_kwargs}
        kwargs["drop_path_rate"] = 0.0
        teacher = create_model(name, **kwargs)
    load_checkpoint(teacher, cfg.teacher)  # CheckpointMismatchError names keys/shapes that do not fit
    check_teacher(student, teacher, token_distill=cfg.token_distill_weight > 0, mode=cfg.distill_mode)
    teacher.eval().requires_grad_(False)
    return teacher


def _make_ema(model: nn.Module, decay: float) -> Any:
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def mix_clips(mix: Any) -> Any:
    """timm's cutmix boxes the last two dimensions: a clip batch (B, C, T, H, W) is mixed as (B, C*T, H, W), so
    one box covers the same place in every frame of a clip."""
    def apply(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 5:
            return mix(x, y)
        flat, y = mix(x.flatten(1, 2), y)
        return flat.view_as(x), y
    return apply


def _mixup(cfg: TrainConfig, num_classes: int) -> tuple[Any, nn.Module]:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
        fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                   switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                   num_classes=num_classes)
        return mix_clips(fn), SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint ``cfg.resume`` names (``auto``: OUTPUT_DIR/last.pth if it exists), else None."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        if not cfg.output_dir:
            raise ValueError("--resume auto needs --output-dir")
        path = Path(cfg.output_dir) / "last.pth"
        return path if path.exists() else None
    return Path(cfg.resume)


RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "summary.json", "config.yaml", "tensorboard")


def _run_files(folder: Path) -> list[str]:
    return [name for name in RUN_FILES if (folder / name).exists()]


def output_folder(cfg: TrainConfig, resume: Path | None) -> Path | None:
    """The folder this run writes to, checked before anything is written.

    A folder already holding a run is refused (its ``best.pth`` and ``metrics.jsonl`` would be replaced or
    mixed with this run's) unless this run resumes a checkpoint of that folder, or ``existing_output`` is
    ``overwrite`` (the old run's files are deleted once everything else is validated) or ``new`` (the first
    free numbered folder ``OUTPUT_DIR-2``, ``-3``, ... is used instead).
    """
    if not cfg.output_dir:
        return None
    out = Path(cfg.output_dir)
    found = _run_files(out)
    if not found or cfg.existing_output == "overwrite":
        return out
    if resume is not None and resume.resolve().parent == out.resolve():
        return out
    if cfg.existing_output == "new":
        n = 2
        while _run_files(Path(f"{out}-{n}")):
            n += 1
        return Path(f"{out}-{n}")
    raise ValueError(f"output folder {out} already holds a run ({', '.join(found)}): pass --resume auto to "
                     f"continue it, --overwrite to replace it, --new-run to write to the next free {out}-N "
                     f"folder, or another --output-dir")


def _claim_output(out: Path, cfg: TrainConfig) -> None:
    """Create the output folder (deleting an old run's files if ``existing_output`` is overwrite) and record the
    config. Called only once the data, model and teacher have been built, so a bad option changes nothing."""
    if cfg.existing_output == "overwrite" and not cfg.resume:
        old = _run_files(out)
        if old:
            print(f"--overwrite: deleting the previous run's {', '.join(old)} in {out}", flush=True)
        for name in old:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def train(cfg: TrainConfig) -> dict[str, Any]:
    dist_info = init_distributed(cfg.device)
    try:
        return _Run(cfg, dist_info).run()
    finally:
        from .distributed import cleanup

        cleanup()


class _Run:
    def __init__(self, cfg: TrainConfig, dist_info: DistInfo) -> None:
        self.cfg, self.dist, self.device = cfg, dist_info, dist_info.device
        main = dist_info.is_main
        resume = resume_path(cfg)
        self.out = output_folder(cfg, resume)  # nothing is written before every check has passed
        if self.out is not None and str(self.out) != cfg.output_dir:
            cfg = self.cfg = dataclasses.replace(cfg, output_dir=str(self.out))
        self.resume_ckpt = read_checkpoint(resume) if resume else None  # unreadable: clear error, before any work
        seed_everything(cfg.seed + dist_info.rank)

        in_chans, size = resolve_input(cfg)
        data_opts = cfg.data_options(in_chans)
        data_opts.input_size = size
        self.data = build_data(data_opts, self.device, dist_info.rank, dist_info.world_size)
        num_classes = cfg.num_classes or self.data.num_classes
        if num_classes < self.data.num_classes:
            raise ValueError(f"num_classes={num_classes} but the data has {self.data.num_classes} classes")
        self.num_classes, self.img_size, self.in_chans = num_classes, self.data.input_size, in_chans
        finetune = cfg.finetune if self.resume_ckpt is None else None
        self.model = build_from_config(cfg, num_classes, in_chans, self.data.input_size, finetune,
                                       skip_mismatched_head=True).to(self.device)
        self.teacher = (build_teacher(cfg, self.model, num_classes, in_chans, self.data.input_size).to(self.device)
                        if cfg.teacher else None)

        self.accum = cfg.accum_steps
        self.steps_per_epoch = len(self.data.train) // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch has {len(self.data.train)} batches, fewer than accum_steps={self.accum}")
        global_batch = cfg.batch_size * dist_info.world_size * self.accum
        self.lr = scaled_lr(cfg.lr, global_batch, cfg.unscale_lr)
        self.global_batch = global_batch
        self.optimizer = build_optimizer(self.model, self.lr, cfg.weight_decay, cfg.no_weight_decay, cfg.opt_eps,
                                         tuple(cfg.opt_betas))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, self.total_steps,
                                         int(round(cfg.warmup_epochs * self.steps_per_epoch)), cfg.min_lr,
                                         cfg.warmup_lr)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.dtype = cfg.amp_dtype if self.use_amp else "fp32"  # autocast precision of every forward
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == "fp16")
        self.ema = _make_ema(self.model, cfg.model_ema_decay) if cfg.model_ema else None
        self.mixup_fn, criterion = _mixup(cfg, num_classes)
        amp_dtype = torch_dtype(self.dtype)
        self.loss_fn = TrainingLoss(criterion, LossWeights(cfg.cls_weight, cfg.distill_weight,
                                                           cfg.distill_temperature, cfg.token_distill_weight,
                                                           cfg.distill_mode, cfg.teacher_input_size),
                                    self.teacher, cuda_graph=cfg.teacher_cuda_graph, autocast_dtype=amp_dtype)
        self.forward: nn.Module = StudentForward(self.model)
        self.graphed_step = None  # the GraphedStudent, when the step replays CUDA graphs
        if cfg.cuda_graph and self.device.type == "cuda" and not dist_info.enabled:
            from .cuda_graph import GraphedStudent

            self.forward = self.graphed_step = GraphedStudent(self.forward, self.model, amp_dtype)
        if dist_info.enabled:
            self.forward = nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_top1 = -1.0
        self.last_eval: dict[str, Any] = {}
        if self.resume_ckpt is not None:
            self._load_state(self.resume_ckpt)
            self.resume_ckpt = None
        barrier()  # every rank has passed every check
        if self.out is not None and main:
            _claim_output(self.out, cfg)
        self.log = MetricsLog(self.out, main, cfg.tensorboard)
        self.train_images, self.train_seconds = 0, 0.0

    # ------------------------------------------------------------------ state
    def _state(self, rng_states: list[Any]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size,
            "best_top1": self.best_top1, "rng": rng_states, "config": _plain(self.cfg.to_dict()),
            "num_classes": self.num_classes, "img_size": self.img_size, "in_chans": self.in_chans,
        }

    def save(self, name: str) -> Path | None:
        rng_states = all_gather_objects(capture_rng_state())  # every rank's, for an exact resume
        path = None
        if self.dist.is_main and self.out is not None:
            path = atomic_save(self._state(rng_states), self.out / name)
        barrier()
        return path

    def _load_state(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            raise ValueError(f"cannot resume: the checkpoint has {ckpt['steps_per_epoch']} steps per epoch, this "
                             f"run {self.steps_per_epoch} (batch size, data or process count changed)")
        load_checkpoint(self.model, {"model": ckpt["model"]})
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("model_ema") is not None:
            self.ema.module.load_state_dict(ckpt["model_ema"])
        self.epoch, self.step_in_epoch = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        self.global_step, self.best_top1 = int(ckpt["global_step"]), float(ckpt.get("best_top1", -1.0))
        rng = ckpt.get("rng") or []
        if len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
        elif self.dist.is_main:
            print(f"resume: RNG states saved by {len(rng)} processes, running {self.dist.world_size}: "
                  f"random draws will differ from the original run")

    # ------------------------------------------------------------------ loop
    def _should_stop(self, stopper: StopRequested, start: float) -> bool:
        cfg = self.cfg
        local = stopper.signal is not None
        if cfg.stop_after_steps is not None and self.global_step >= cfg.stop_after_steps:
            local = True
        if cfg.time_limit_s is not None and time.time() - start >= cfg.time_limit_s:
            local = True
        if self.dist.enabled:  # every rank stops at the same step
            return all_reduce_sum([float(local)], self.device)[0] > 0
        return local

    def train_step(self, batches: Any) -> dict[str, torch.Tensor]:
        """One optimizer step over ``accum_steps`` micro-batches (DDP syncs gradients on the last one only)."""
        terms_sum: dict[str, torch.Tensor] = {}
        ddp = self.dist.enabled
        for micro in range(self.accum):
            images, targets = next(batches)
            if self.mixup_fn is not None:
                images, targets = self.mixup_fn(images, targets)
            sync = self.forward.no_sync() if ddp and micro < self.accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.dtype):
                    logits, state = self.forward(images)
                    loss, terms = self.loss_fn(self.model, images, logits, state, targets)
                self.scaler.scale(loss / self.accum).backward()
            terms["loss"] = loss.detach()
            for key, value in terms.items():
                terms_sum[key] = terms_sum.get(key, 0.0) + value.float() / self.accum
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            terms_sum["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.step_in_epoch += 1
        self.scheduler.step_update(self.global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        return terms_sum

    def run(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.is_main
        start = time.time()
        if self.global_step == 0:
            self.scheduler.step_update(0)
        if main:
            print(f"training {cfg.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M params) on "
                  f"{self.data.train_size} images, {self.data.num_classes} classes, {self.img_size}px, "
                  f"{self.dist.world_size} process(es) on {self.device}, global batch {self.global_batch}, "
                  f"lr {self.lr:.3g}, {cfg.epochs} epochs x {self.steps_per_epoch} steps"
                  + (f", resuming at epoch {self.epoch} step {self.step_in_epoch}" if self.global_step else ""),
                  flush=True)
        stopped = False
        with StopRequested() as stopper:
            while self.epoch < cfg.epochs and not stopped:
                stopped = self._run_epoch(stopper, start)
                if stopped:
                    break
                self.epoch += 1
                self.step_in_epoch = 0
                evaluated = self._end_of_epoch()
                if evaluated and self.last_eval["top1"] > self.best_top1:
                    self.best_top1 = self.last_eval["top1"]
                    self.save("best.pth")
                self.save("last.pth")
        if stopped:
            path = self.save("last.pth")
            reason = f"signal {stopper.signal}" if stopper.signal is not None else "step/time limit"
            if main:
                print(f"stopped ({reason}) at epoch {self.epoch} step {self.step_in_epoch}; "
                      + (f"checkpoint {path}; continue with --resume {path}" if path else "no --output-dir"),
                      flush=True)
        summary = self._summary(time.time() - start, stopped)
        summary["stop_signal"] = stopper.signal  # the CLI exits 128 + signal, as shells expect
        if main and self.out is not None:
            write_json(self.out / "summary.json", summary)
        self.log.close()
        return summary

    def _run_epoch(self, stopper: StopRequested, start: float) -> bool:
        cfg, main = self.cfg, self.dist.is_main
        self.model.train()
        self.data.train.set_epoch(self.epoch, self.step_in_epoch * self.accum * cfg.batch_size)
        batches = iter(self.data.train)
        bar = None
        if main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch}",
                       dynamic_ncols=True, leave=False)
        window_t, window_steps, window_terms = time.time(), 0, {}
        log_every = max(1, min(20, self.steps_per_epoch // 4 or 1))
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                terms = self.train_step(batches)
                window_steps += 1
                for k, v in terms.items():
                    window_terms[k] = window_terms.get(k, 0.0) + v
                if bar is not None:
                    bar.update(1)
                stop = self._should_stop(stopper, start)
                if stop or self.global_step % log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                    keys = sorted(window_terms)
                    sums = all_reduce_sum([float(window_terms[k]) for k in keys], self.device)
                    values = {k: v / window_steps / self.dist.world_size for k, v in zip(keys, sums)}
                    if not all(math.isfinite(v) for v in values.values()):
                        raise FloatingPointError(f"non-finite loss at step {self.global_step}: {values}")
                    elapsed = time.time() - window_t
                    window_images = window_steps * self.global_batch
                    img_s = window_images / max(elapsed, 1e-9)
                    self.train_images += window_images
                    self.train_seconds += elapsed
                    lr = self.optimizer.param_groups[0]["lr"]
                    if main:
                        self.log.log("train", self.global_step, epoch=self.epoch, lr=lr, img_per_s=img_s, **values)
                        if bar is not None:
                            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
                    window_t, window_steps, window_terms = time.time(), 0, {}
                if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0 \
                        and self.step_in_epoch < self.steps_per_epoch:
                    self.save("last.pth")
                if stop:
                    return True
        finally:
            if bar is not None:
                bar.close()
        return False

    def _end_of_epoch(self) -> bool:
        cfg, main = self.cfg, self.dist.is_main
        if self.epoch % cfg.eval_every and self.epoch != cfg.epochs:
            return False
        result = evaluate(self.model, self.data.val, self.device, self.dtype)
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.data.val, self.device, self.dtype)
            result.update({f"ema_{k}": v for k, v in ema.items() if k != "num_images"})
        self.last_eval = result
        if main:
            self.log.log("eval", self.global_step, epoch=self.epoch, **result)
            ema_txt = f", EMA top-1 {result['ema_top1']:.2f}%" if "ema_top1" in result else ""
            print(f"epoch {self.epoch}/{cfg.epochs}: val top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                  f"loss {result['loss']:.4f}{ema_txt}", flush=True)
        return True

    def _summary(self, wall_s: float, stopped: bool) -> dict[str, Any]:
        from ..analysis.flops import count_flops

        params = sum(p.numel() for p in self.model.parameters())
        flops = count_flops(self.model, self.img_size)
        summary = {
            "model": self.cfg.model, "method": self.cfg.method, "epochs_done": self.epoch,
            "epochs": self.cfg.epochs, "global_step": self.global_step, "stopped_early": stopped,
            "data": self.cfg.data_path if self.cfg.data_path == DIGITS else Path(self.cfg.data_path).name,
            "train_images": self.data.train_size, "val_images": self.data.val_size,
            "img_size": self.img_size, "num_classes": self.num_classes, "params": params,
            "gflops": flops.gflops("paper"), "gflops_full": flops.gflops("full"),
            "global_batch": self.global_batch, "lr": self.lr, "world_size": self.dist.world_size,
            "device": str(self.device), "amp": self.use_amp and self.dtype,
            "wall_s": wall_s, "train_img_per_s": self.train_images / max(self.train_seconds, 1e-9),
            "best_top1": self.best_top1 if self.best_top1 >= 0 else None, "output_dir": str(self.out or ""),
        }
        summary.update({k: v for k, v in self.last_eval.items()})
        if self.device.type == "cuda":
            summary["device_name"] = torch.cuda.get_device_name(self.device)
            step = self.graphed_step
            summary["train_step_cuda_graph"] = "n/a (off or DDP)" if step is None else (step.failed or True)
        return summary


def _plain(value: Any) -> Any:
    """Config values as YAML/weights_only-safe builtins (tuples -> lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def set_threads_from_env() -> None:
    """Respect OMP_NUM_THREADS under torchrun (which sets it to 1 by default)."""
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
