"""``mambatrim train``: the DeiT/Vim training recipe, distillation, DDP under torchrun, exact resume.

Options follow DeiT's names; every config key (see ``mambatrim.engine.config.TrainConfig``) can also be set
with ``--set key=value``. Precedence: defaults < ``--config FILE.yaml`` < command-line options.

Without ``--config``, ``--model`` or ``--data-path`` it trains the small digits recipe of ``mambatrim demo``
(configs/digits_vim_micro.yaml: 0.17 M parameters, 6 epochs, a few minutes on a 2-core CPU); the defaults
of the full recipe (Vim-Ti, 300 epochs, DeiT augmentation) apply as soon as any of them is given.
``--resume CKPT`` alone continues a run with the configuration stored in the checkpoint; an option that would
change the run is refused. An output folder that already holds a run is never silently replaced.
"""
from __future__ import annotations

import argparse
import json
from typing import Any


EXAMPLES = """examples:
  mambatrim train --output-dir runs/digits          # the small digits recipe: a few minutes on a 2-core CPU
  mambatrim train --config configs/cifar10_vim_tiny_p2.yaml --data-path cifar10.zip --output-dir runs/c10
  torchrun --nproc_per_node=8 -m mambatrim train --config configs/vim_tiny_pretrain.yaml --data-path imagenet/
  mambatrim train --output-dir runs/c10 --resume auto          # continue an interrupted run
  mambatrim train --resume runs/c10/last.pth                   # the same: the checkpoint holds its config
  mambatrim train --finetune dense.pth --teacher dense.pth --method NAME --method-opt ratio=0.3
  mambatrim train --config configs/videomamba_moving_shapes.yaml --output-dir runs/shapes   # video, CPU
"""

# (flags, config key, argparse kwargs); every default is None so only what was given overrides the config
_OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--model",), "model", dict(help="registered model name (mambatrim models)")),
    (("--model-opt",), "model_kwargs", dict(action="append", metavar="KEY=VALUE",
                                           help="override the model config, e.g. depth=12 patch_size=2")),
    (("--num-classes", "--nb-classes"), "num_classes", dict(type=int, help="classifier size (default: the data's)")),
    (("--drop-path",), "drop_path", dict(type=float)),
    (("--method",), "method", dict(help="reduction method to attach (mambatrim.reduce.METHODS)")),
    (("--method-opt",), "method_opts", dict(action="append", metavar="KEY=VALUE", help="method option, repeatable")),
    (("--finetune",), "finetune", dict(help="initial weights (a classifier of another size is skipped)")),
    (("--data-path", "--data_path"), "data_path",
     dict(help="'digits' (bundled), a folder or a .zip with train/ and val/ (or test/) class folders")),
    (("--data-mode",), "data_mode", dict(choices=["auto", "memory", "stream"],
                                        help="decode all images into memory, or stream them (default auto)")),
    (("--task",), "task", dict(choices=["image", "video", "segmentation"],
                               help="image (default) | video: clips (B, C, T, H, W) from a video folder or "
                                    "'moving-shapes' | segmentation: UperNet, ADE20K layout (configs/seg_*.yaml)")),
    (("--num-frames",), "num_frames", dict(type=int, help="video: frames per clip (TSN segments, default 8)")),
    (("--test-clips", "--test-num-segment"), "test_clips", dict(type=int, help="video evaluation: clips per video")),
    (("--test-crops", "--test-num-crop"), "test_crops", dict(type=int, help="video evaluation: crops per clip")),
    (("--input-size", "--img-size"), "input_size", dict(type=int, help="image side in pixels")),
    (("--in-chans",), "in_chans", dict(type=int, help="image channels (default: the model's)")),
    (("--batch-size",), "batch_size", dict(type=int, help="per process")),
    (("--eval-batch-size",), "eval_batch_size", dict(type=int, help="per process (default: --batch-size)")),
    (("--num-workers", "--num_workers"), "num_workers", dict(type=int, help="data-loading processes")),
    (("--epochs",), "epochs", dict(type=int)),
    (("--accum-steps",), "accum_steps", dict(type=int)),
    (("--lr",), "lr", dict(type=float, help="base lr, scaled by global batch / 512 unless --unscale-lr")),
    (("--unscale-lr",), "unscale_lr", dict(action="store_const", const=True)),
    (("--min-lr",), "min_lr", dict(type=float)),
    (("--warmup-lr",), "warmup_lr", dict(type=float)),
    (("--warmup-epochs",), "warmup_epochs", dict(type=float)),
    (("--weight-decay",), "weight_decay", dict(type=float)),
    (("--no-weight-decay",), "no_weight_decay",
     dict(nargs="*", help="exempt groups: 1d bias norm pos_embed cls_token A_log D model (default: 1d bias model)")),
    (("--clip-grad",), "clip_grad", dict(type=float)),
    (("--mixup",), "mixup", dict(type=float)),
    (("--cutmix",), "cutmix", dict(type=float)),
    (("--smoothing",), "smoothing", dict(type=float)),
    (("--aa",), "aa", dict()),
    (("--reprob",), "reprob", dict(type=float)),
    (("--repeated-aug",), "repeated_aug", dict(type=int, help="repeats (3 = DeiT); 1 = off")),
    (("--model-ema",), "model_ema", dict(action="store_const", const=True)),
    (("--model-ema-decay",), "model_ema_decay", dict(type=float)),
    (("--teacher", "--teacher-path"), "teacher", dict(help="checkpoint of the frozen dense teacher")),
    (("--teacher-model",), "teacher_model", dict()),
    (("--distill-mode",), "distill_mode", dict(choices=["kl", "hard"], help="kl: KL on logits; hard: CE of the "
                                               "student's dist_head against the teacher's argmax (DeiT)")),
    (("--distill-weight",), "distill_weight", dict(type=float)),
    (("--distill-temperature",), "distill_temperature", dict(type=float)),
    (("--token-distill-weight",), "token_distill_weight", dict(type=float)),
    (("--output-dir", "--output_dir"), "output_dir", dict()),
    (("--overwrite",), "existing_output",
     dict(action="store_const", const="overwrite", help="replace the run already in --output-dir")),
    (("--new-run",), "existing_output",
     dict(action="store_const", const="new", help="if --output-dir holds a run, write to OUTPUT_DIR-2, -3, ...")),
    (("--resume",), "resume", dict(help="checkpoint to continue, or 'auto' (OUTPUT_DIR/last.pth if present)")),
    (("--seed",), "seed", dict(type=int)),
    (("--device",), "device", dict(help="auto | cpu | cuda")),
    (("--save-every-steps",), "save_every_steps", dict(type=int)),
    (("--stop-after-steps",), "stop_after_steps", dict(type=int)),
    (("--time-limit",), "time_limit_s", dict(type=float, help="seconds; stop with a checkpoint after this")),
    (("--tensorboard",), "tensorboard", dict(action="store_const", const=True)),
]


# what evaluation uses (``mambatrim eval`` shows only these)
EVAL_KEYS = ("model", "model_kwargs", "num_classes", "method", "method_opts", "data_path", "data_mode",
             "input_size", "in_chans", "eval_batch_size", "num_workers", "device", "task", "num_frames",
             "test_clips", "test_crops")


def add_config_arguments(parser: argparse.ArgumentParser, keys: tuple[str, ...] | None = None) -> None:
    """The config options (all of them, or only ``keys``), --amp/--no-amp, --no-progress and --set."""
    parser.add_argument("--config", help="YAML recipe (see configs/); command-line options override it")
    for flags, key, kwargs in _OPTIONS:
        if keys is None or key in keys:
            parser.add_argument(*flags, dest=key, default=None, **kwargs)
    amp = parser.add_mutually_exclusive_group()
    amp.add_argument("--amp", dest="amp", action="store_const", const=True, default=None,
                     help="bf16 autocast on GPU (default)")
    amp.add_argument("--no-amp", "--no_amp", dest="amp", action="store_const", const=False, help="fp32 on GPU too")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                        help="no progress bars")
    if keys is None:
        parser.add_argument("--dist-eval", action="store_true",
                            help="accepted for DeiT compatibility: evaluation is always sharded over the processes")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", default=[],
                        help="set any config key (YAML value), e.g. --set mixup_mode=elem")


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """Merge: defaults < ``base`` < --config < explicit options < --set."""
    from ..engine.config import make_config

    return make_config(base or {}, *_user_layers(args))


def _user_layers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """--config, the explicit options and --set, in order of precedence."""
    from ..engine.config import load_yaml
    from ..reduce import parse_method_options

    layers: list[dict[str, Any]] = []
    if args.config:
        layers.append(load_yaml(args.config))
    explicit = {key: getattr(args, key) for _, key, _ in _OPTIONS if getattr(args, key, None) is not None}
    for key in ("model_kwargs", "method_opts"):
        if key in explicit:
            explicit[key] = parse_method_options(explicit[key])
    for key in ("amp", "progress"):
        if getattr(args, key, None) is not None:
            explicit[key] = getattr(args, key)
    layers.append(explicit)
    layers.append(parse_method_options(getattr(args, "overrides", [])))
    return layers


# options a resumed run may change without changing what it computes
RESUME_FREE = {"output_dir", "resume", "existing_output", "device", "progress", "tensorboard", "num_workers",
               "eval_batch_size", "eval_every", "save_every_steps", "stop_after_steps", "time_limit_s", "dist_eval",
               "cuda_graph", "teacher_cuda_graph"}


def training_config(args: argparse.Namespace):
    """The run's config: a resumed checkpoint's stored config under the command line's options (any that would
    change the run refused, naming each), else the small digits recipe when no --config, --model or
    --data-path is given, else the full recipe's defaults under the command line's options."""
    import dataclasses

    from ..engine.config import make_config
    from ..engine.demo import DEMO_RECIPE
    from ..engine.train import resume_path
    from ..models.checkpoint import read_checkpoint

    cfg = config_from_args(args)
    path = resume_path(cfg)
    stored = (read_checkpoint(path).get("config") or None) if path is not None else None
    if stored is None:
        if args.config or args.model or args.data_path or args.finetune or \
                any(k.startswith(("model=", "data_path=")) for k in args.overrides):
            return cfg
        print("no --config, --model or --data-path: training the small digits recipe "
              "(configs/digits_vim_micro.yaml)", flush=True)
        return config_from_args(args, DEMO_RECIPE)
    original, cfg = make_config(stored), config_from_args(args, stored)
    changed = [(key, getattr(cfg, key), getattr(original, key)) for key in dataclasses.asdict(cfg)
               if getattr(cfg, key) != getattr(original, key)]
    refused = [f"{key}={new!r} (checkpoint: {old!r})" for key, new, old in changed if key not in RESUME_FREE]
    if refused:
        raise ValueError(f"cannot resume {path} exactly: {', '.join(refused)} "
                         f"{'differs' if len(refused) == 1 else 'differ'} from the run's stored config; "
                         f"leave them out (the checkpoint's values are used) or start a new run")
    notes = [f"{key}={new!r} (was {old!r})" for key, new, old in changed if key not in ("resume", "existing_output")]
    print(f"resuming {path} with its stored config" + (f"; changed: {', '.join(notes)}" if notes else ""),
          flush=True)
    return cfg


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("train", help="train or fine-tune a model (DDP under torchrun)",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--eval", action="store_true",
                        help="only evaluate the --resume (or --finetune) checkpoint, as in DeiT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.task == "segmentation":
        from .segment import run_eval, run_train

        if args.eval:
            args.checkpoint = args.resume or args.finetune
            args.resume = args.finetune = None
            return run_eval(args)
        return run_train(args)
    if args.eval:
        from ..engine.evaluate import config_from_checkpoint, evaluate_checkpoint
        from ..models.checkpoint import read_checkpoint

        path = args.resume or args.finetune
        cfg = config_from_args(args, config_from_checkpoint(read_checkpoint(path)) if path else None)
        result = evaluate_checkpoint(cfg, path)
        print(json.dumps({k: v for k, v in result.items() if k != "bench"}, indent=2))
        return 0
    cfg = training_config(args)
    from ..engine.train import set_threads_from_env, train

    set_threads_from_env()
    summary = train(cfg)
    if summary.get("top1") is not None:
        print(f"done: top-1 {summary['top1']:.2f}% (best {summary['best_top1']:.2f}%), "
              f"{summary['epochs_done']}/{summary['epochs']} epochs in {summary['wall_s']:.0f}s, "
              f"{summary['train_img_per_s']:.0f} img/s training")
    if summary.get("stop_signal") is not None:
        return 128 + int(summary["stop_signal"])  # 130 for SIGINT, 143 for SIGTERM, as shells expect
    return 0
