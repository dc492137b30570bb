"""``mambatrim demo``: train a small Vim on the bundled digits (CPU, minutes), then measure reduction methods on
it, training-free and briefly re-trained, against the dense model: accuracy, FLOPs and speed relative to dense.
A control row re-trains the dense model the same epochs with the same loss; accuracy is judged against the better
of the two dense rows, so extra epochs alone cannot make a re-trained method look as good as dense.

Why this set-up: the digits are upsampled to 32 x 32 and cut into 4 x 4 patches, so the model sees 64 patch
tokens (one per original pixel) and the per-token work of its blocks dominates; with a handful of tokens a
single merge removes a large share of the image and the per-layer bookkeeping of a method costs more than it
saves. Speed is measured by the one comparison harness (:func:`mambatrim.engine.compare.time_models`): every
configuration timed once per round, interleaved, in one process (on a CPU a round's time is the fastest of its
calls, the one least disturbed by other processes); a row reports the median ratio to dense over the rounds
with its spread, so a busy machine slows every row alike instead of flipping the picture.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

# The demo recipe (configs/digits_vim_micro.yaml holds the same settings).
DEMO_RECIPE: dict[str, Any] = dict(
    model="vim_tiny_patch16_224", model_kwargs={"embed_dim": 64, "depth": 4, "patch_size": 4, "stride": 4},
    data_path="digits", input_size=32, in_chans=1, batch_size=64, epochs=6, eval_every=3, lr=1.2e-2,
    unscale_lr=True, min_lr=1e-5, warmup_epochs=1, warmup_lr=1e-5, weight_decay=0.05, drop_path=0.0, mixup=0.0,
    cutmix=0.0, smoothing=0.0, gpu_aug_pad=2, gpu_aug_flip=False, mean=(0.5,), std=(0.5,), num_workers=0,
)
RETRAIN_EPOCHS = 2  # R-MeeTo re-trains 3 epochs on ImageNet; DyVM fine-tunes 30 (here: a few, same loss)
RETRAIN_LR = 1e-3  # before the batch scaling of the recipe (x 64 / 512); the image demo's own: IMAGE_DEMO
ACCURACY_MARGIN = 2.0  # points of top-1: "keeps the accuracy" in the verdict line


CONTROL = "dense re-trained (control)"


@dataclass(frozen=True)
class Variant:
    """One row of the demo: a method with its options for the demo model, and whether it is re-trained
    (distilled from the dense model through the one training loop, as R-MeeTo and DyVM do)."""

    name: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    retrain: bool = False


# Settings for the demo model (4 blocks, 64 patch tokens); every one removes about a third of the token work.
# R-MeeTo merges in the last two blocks only: merging from block 1 on (ratio 0.35) saved 1.47x FLOPs but its
# re-trained top-1 stayed 6 points below dense; blocks 2-3 at ratio 0.3 save 1.39x and re-train to dense's level.
_RMEETO = {"ratio": 0.3, "layers": [2, 3]}
_TOP = {"keep": 0.7, "layers": [1, 2]}
_DYVM = {"keep": 0.7, "block_ratio": 0.8, "layers": [1, 2]}
_RMEETO_DYVM = {"methods": [{"name": "rmeeto", **_RMEETO}, {"name": "dyvm", "keep": None, "block_ratio": 0.8}]}
_TOP_RMEETO = {"methods": [{"name": "top", "keep": 0.8, "layers": [1]}, {"name": "rmeeto", "r": 8, "layers": [2, 3]}]}
DEMO_VARIANTS: tuple[Variant, ...] = (
    Variant("dense"),
    # the control: dense re-trained the same extra epochs with the same loss, so that a re-trained method is not
    # credited with what the extra epochs alone give (or blamed for what they take)
    Variant(CONTROL, retrain=True),
    Variant("rmeeto", "rmeeto", _RMEETO), Variant("rmeeto re-trained", "rmeeto", _RMEETO, retrain=True),
    Variant("top", "top", _TOP),
    Variant("dyvm fine-tuned", "dyvm", _DYVM, retrain=True),  # learned predictors: useless untrained
    Variant("prune_norm", "prune_norm", _TOP),
    # combined methods (ours, reduce/combine.py): merging + DyVM's per-image scan selection; pruning + merging
    Variant("rmeeto+dyvm blocks re-trained", "combine", _RMEETO_DYVM, retrain=True),
    Variant("top+rmeeto", "combine", _TOP_RMEETO),
)


def describe_model(model: nn.Module, img_size: int) -> str:
    """What the demo model really is (its registered name alone would suggest a full-size model at 224 px)."""
    tokens = model.patch_embed.num_patches
    params = sum(p.numel() for p in model.parameters()) / 1e6
    from ..models import MODELS

    frames = getattr(model, "num_frames", None)
    clip = f"{frames} frames of " if frames else ""
    entry = MODELS.get(getattr(model, "pretrained_cfg", {}).get("architecture", ""))
    family = entry.family if entry is not None else type(model).__name__
    return (f"{family} with {model.depth} blocks, {model.embed_dim}-dim, {clip}{img_size} x {img_size} "
            f"px in {model.patch_embed.patch_size} px patches = {tokens} patch tokens + class token, "
            f"{params:.2f} M params")


@dataclass(frozen=True)
class DemoTask:
    """What a demo trains and measures: its recipe, rows, output file stem and plot title."""

    recipe: dict[str, Any]
    variants: tuple[Variant, ...]
    stem: str = "demo"
    title: str = "Vim on the bundled digits (64 tokens): accuracy vs work and speed (hollow: training-free)"
    bench_dtype: torch.dtype | None = None  # autocast dtype of the timing on a GPU (None: fp32)
    retrain_lr: float = RETRAIN_LR


# re-training at 4e-3 (x 64 / 512): at 1e-3 the re-trained R-MeeTo row ended 2.2 points lower in two epochs
IMAGE_DEMO = DemoTask(DEMO_RECIPE, DEMO_VARIANTS, retrain_lr=4e-3)


def run_demo(output_dir: str | Path, device: str = "cpu", epochs: int | None = None, threads: int | None = 1,
             retrain_epochs: int = RETRAIN_EPOCHS, task: DemoTask = IMAGE_DEMO, rounds: int = 7,
             iters: int = 3, progress: bool = True, reuse_runs: bool = False,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the dense demo model, evaluate and (re-)train every variant of ``task``, time them all against
    dense in one process, and write ``STEM_results.json``, ``STEM_results.md`` and ``STEM_tradeoff.png`` to
    ``output_dir`` (STEM: ``task.stem``, 'demo' for the image demo).

    ``reuse_runs``: a run folder that already holds a finished run (``last.pth``) is measured again instead of
    trained again (e.g. to re-time on a quieter machine)."""
    from ..engine.config import make_config
    from ..engine.report import write_result

    if threads:
        torch.set_num_threads(threads)
    start = time.time()
    out = Path(output_dir)
    # the demo's own run folders are replaced by a new demo (the old run's files are listed as they go)
    base = {"device": device, "progress": progress, "existing_output": "overwrite",
            **({"epochs": epochs} if epochs is not None else {})}
    recipe, variants, stem = task.recipe, task.variants, task.stem
    dense_cfg = make_config(recipe, base, {"output_dir": str(out / f"{stem}_run")})
    dense_ckpt = str(out / f"{stem}_run" / "last.pth")
    summary = _train_or_reuse(dense_cfg, dense_ckpt, reuse_runs)
    train_s = time.time() - start

    data, models, rows = load_eval_data(dense_cfg), {}, []
    for v in variants:
        cfg = make_config(recipe, base, {"method": v.method, "method_opts": v.options})
        weights, t0 = dense_ckpt, time.time()
        if v.retrain:
            run_dir = out / f"{stem}_run_{_slug(v.name)}"
            weights = _retrain(recipe, base, v, dense_ckpt, run_dir, retrain_epochs, task.retrain_lr, reuse_runs)
        models[v.name] = build_eval_model(cfg, data, weights)
        from .evaluate import evaluate

        acc = evaluate(models[v.name], data.val, data.device)
        rows.append({"name": v.name, "method": v.method, "options": v.options, "top1": acc["top1"],
                     "retrain_epochs": retrain_epochs if v.retrain else 0, "seconds": time.time() - t0})
        log(f"{v.name}: top-1 {acc['top1']:.2f}%")
    load_before = os.getloadavg()
    amp = task.bench_dtype if data.device.type == "cuda" else None
    timing = _time(models, variants, data.bench_images, rounds, iters, log, amp)
    for row, t in zip(rows, timing):
        row.update({k: t[k] for k in ("gflops", "flops_ratio", "tokens_per_layer", "executed_directions",
                                      "img_per_s", "speedup", "speedup_spread")})
        row["why_slower"] = why_slower(row)
    result = {"model": describe_model(models["dense"], data.input_size), "recipe": recipe,
              "train_seconds": train_s, "train_summary": summary, "rows": rows,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "device": device,
              "gpu": torch.cuda.get_device_name(data.device) if data.device.type == "cuda" else None,
              "load_average_before_timing": load_before, "load_average_after_timing": os.getloadavg(),
              "timing": {"rounds": rounds, "iters_per_round": iters, "batch_size": len(data.bench_images),
                         "dtype": str(amp or torch.float32)},
              "wall_seconds": time.time() - start, "reused_runs": reuse_runs}
    result["table"] = format_table(result)
    result["verdict"] = verdict(rows)
    write_result(out, f"{stem}_results", result, result["table"] + "\n\n" + result["verdict"] + "\n")
    result["plot"] = str(plot_tradeoff(rows, out / f"{stem}_tradeoff.png", task.title))
    return result


@dataclass
class EvalData:
    val: Any
    device: torch.device
    input_size: int
    in_chans: int
    num_classes: int
    bench_images: torch.Tensor


def load_eval_data(cfg: Any) -> EvalData:
    """The evaluation split of ``cfg``'s data (the held-out digits in the demo) and its first batch (the demo's
    timed input, ``mambatrim visualize``'s images)."""
    from ..data import build_data
    from .benchmark import resolve_device
    from .config import resolve_input

    device = resolve_device(cfg.device)
    in_chans, size = resolve_input(cfg)
    opts = cfg.data_options(in_chans)
    opts.input_size = size
    data = build_data(opts, device, 0, 1, with_train=False)
    images = next(iter(data.val))[0]
    if images.dim() == 6:  # video evaluation batches hold several views of a clip: time one view each
        images = images[:, 0]
    return EvalData(data.val, device, data.input_size, in_chans, data.num_classes, images)


def build_eval_model(cfg: Any, data: EvalData, weights: str | None) -> nn.Module:
    """``cfg``'s model with its method and ``weights``, on the data's device, in eval mode."""
    from .build import build_from_config

    model = build_from_config(cfg, data.num_classes, data.in_chans, data.input_size, weights)
    return model.to(data.device).eval()


def _slug(name: str) -> str:
    """A row name as part of a folder name: 'dense re-trained (control)' -> 'dense_re-trained_control'."""
    return re.sub(r"[^\w+-]+", "_", name).strip("_")


def _train_or_reuse(cfg: Any, checkpoint: str, reuse: bool) -> dict[str, Any]:
    from .train import train

    if reuse and Path(checkpoint).exists():
        return {"reused": checkpoint}
    return train(cfg)


def _retrain(recipe: dict[str, Any], base: dict[str, Any], v: Variant, dense_ckpt: str, run_dir: Path,
             epochs: int, lr: float = RETRAIN_LR, reuse: bool = False) -> str:
    """Re-train ``v`` briefly from the dense weights, distilling from the dense model (R-MeeTo's and DyVM's
    recipes both distil), through the one training loop."""
    from .config import make_config

    cfg = make_config(recipe, base, {
        "method": v.method, "method_opts": v.options, "finetune": dense_ckpt, "teacher": dense_ckpt,
        "epochs": epochs, "eval_every": epochs, "lr": lr, "warmup_epochs": 0, "output_dir": str(run_dir)})
    _train_or_reuse(cfg, str(run_dir / "last.pth"), reuse)
    return str(run_dir / "last.pth")


def _time(models: dict[str, nn.Module], variants: tuple[Variant, ...], images: torch.Tensor, rounds: int,
          iters: int, log: Callable[[str], None], amp_dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """The comparison harness's rows for the trained models, in ``variants`` order."""
    from .compare import Configuration, time_models

    configs = [Configuration(v.name, v.method, dict(v.options)) for v in variants]
    rows, _ = time_models(models, configs, images, amp_dtype=amp_dtype, rounds=rounds, iters=iters, warmup=2,
                          log=lambda text: log(text) if text.startswith("round") and "dense" in text else None)
    return rows


def why_slower(row: dict[str, Any]) -> str | None:
    """One line saying why a method is not faster than dense here (None when it is)."""
    if row["method"] is None or row["speedup"] >= 1.0:
        return None
    lo, hi = row["speedup_spread"]
    if hi >= 1.0:
        return f"within this machine's timing noise (per-round speed-ups {lo:.2f}-{hi:.2f}x)"
    if row["flops_ratio"] < 1.15:
        return f"removes too little work ({row['flops_ratio']:.2f}x fewer FLOPs) to pay for its selection steps"
    return (f"its per-layer selection / gather steps cost more on this CPU than the {row['flops_ratio']:.2f}x "
            f"fewer FLOPs save at this model size")


def reference(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The dense row accuracy is judged against: the better of dense and its re-trained control (extra epochs
    alone must not make a re-trained method look as good as dense)."""
    return max((r for r in rows if r["method"] is None), key=lambda r: r["top1"])


def verdict(rows: list[dict[str, Any]]) -> str:
    """The line the demo exists for: which methods are faster than dense in every round and keep accuracy, or
    why none is (the methods that meet one of the two conditions, and by how much they miss the other)."""
    ref, margin = reference(rows), ACCURACY_MARGIN
    bar = f"within {margin:g} points of the best dense top-1 ({ref['name']}, {ref['top1']:.2f} %)"
    methods = [r for r in rows if r["method"] is not None]
    fast = [r for r in methods if r["speedup_spread"][0] > 1.0]
    accurate = [r for r in methods if r["top1"] >= ref["top1"] - margin]
    good = [r["name"] for r in fast if r in accurate]
    if good:
        return f"faster than dense in every timing round and {bar}: {', '.join(good)}"
    misses = [f"{r['name']} is faster in every round but {ref['top1'] - r['top1']:.2f} points below" for r in fast]
    misses += [f"{r['name']} is accurate enough but its slowest round is {r['speedup_spread'][0]:.2f}x dense"
               for r in accurate]
    why = f" ({'; '.join(misses)})" if misses else ""
    return f"no method was faster than dense in every round while {bar}{why}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: accuracy, FLOPs and speed relative to dense (median ratio and its per-round spread)."""
    rows = result["rows"]
    dense = next(r for r in rows if r["method"] is None)
    where = (f"GPU timing on {result['gpu']} ({result['timing']['dtype']})" if result.get("gpu") else
             f"CPU timing: {result['threads']} thread(s) of {result['cpus']} cores")
    lines = [f"Model: {result['model']}. {where}, "
             f"batch {result['timing']['batch_size']}, median of {result['timing']['rounds']} interleaved rounds "
             f"{'(mean' if result.get('gpu') else '(fastest'} of {result['timing']['iters_per_round']} calls a round) "
             f"(load average {result['load_average_before_timing'][0]:.1f} before timing).", "",
             "| method | re-trained | top-1 % | vs dense | MFLOPs | FLOPs ratio | img/s | speed-up (spread) | "
             "options |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["speedup_spread"]
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        retrained = f"{r['retrain_epochs']} ep" if r["retrain_epochs"] else "-"
        lines.append(f"| {r['name']} | {retrained} | {r['top1']:.2f} | {r['top1'] - dense['top1']:+.2f} | "
                     f"{r['gflops']['paper'] * 1e3:.2f} | {r['flops_ratio']:.2f}x | {r['img_per_s']:.0f} | "
                     f"{r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | {opts} |")
    notes = [f"- {r['name']} is slower than dense here: {r['why_slower']}" for r in rows if r.get("why_slower")]
    notes += [f"- {r['name']} runs the same network as dense: its per-round speed-ups ({r['speedup_spread'][0]:.2f}-"
              f"{r['speedup_spread'][1]:.2f}x) are this machine's timing noise"
              for r in rows if r["method"] is None and r["retrain_epochs"] and "speedup_spread" in r]
    return "\n".join(lines + ([""] + notes if notes else []))


def plot_tradeoff(rows: list[dict[str, Any]], path: str | Path, title: str = IMAGE_DEMO.title) -> Path:
    """Top-1 vs FLOPs ratio (left) and vs measured speed-up with its spread (right); filled markers re-trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.visualize import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = sorted({r["method"] for r in rows if r["method"]})
    for ax, key in ((axes[0], "flops_ratio"), (axes[1], "speedup")):
        for r in rows:
            dense = r["method"] is None
            colour = "black" if dense else colours[methods.index(r["method"]) % len(colours)]
            err = None
            if key == "speedup":
                lo, hi = r["speedup_spread"]
                err = [[r["speedup"] - lo], [hi - r["speedup"]]]
            marker = ("X" if r["retrain_epochs"] else "*") if dense else "o"  # X: the re-trained dense control
            ax.errorbar([r[key]], [r["top1"]], xerr=err, fmt=marker, ms=13 if dense else 7,
                        color=colour, mfc=colour if (dense or r["retrain_epochs"]) else "white", label=r["name"],
                        capsize=3, zorder=3)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("FLOPs reduction vs dense (x, paper convention)")
    axes[1].set_xlabel("measured speed-up vs dense (x, median and spread of interleaved rounds)")
    axes[0].set_ylabel("top-1 accuracy (%)")
    accs = [r["top1"] for r in rows]
    axes[0].set_ylim(max(0, math.floor(min(accs) - 2)), min(100.5, max(accs) + 1.5))
    axes[1].legend(fontsize=7, loc="lower left")
    return save_figure(fig, path, title, fontsize=12, dpi=110)
