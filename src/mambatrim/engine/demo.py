"""``mambatrim demo``: train a small Vim on the bundled digits (CPU, minutes), then measure every registered
reduction method on it: accuracy, FLOPs and img/s in a table, a JSON file and a trade-off plot."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

# The demo recipe (configs/digits_vim_micro.yaml holds the same settings).
DEMO_RECIPE: dict[str, Any] = dict(
    model="vim_tiny_patch16_224", model_kwargs={"embed_dim": 64, "depth": 4, "patch_size": 4, "stride": 4},
    data_path="digits", input_size=16, in_chans=1, batch_size=64, epochs=12, eval_every=6, lr=2e-3, unscale_lr=True,
    min_lr=1e-5, warmup_epochs=1, warmup_lr=1e-5, weight_decay=0.05, drop_path=0.0, mixup=0.0, cutmix=0.0,
    smoothing=0.0, gpu_aug_pad=1, gpu_aug_flip=False, mean=(0.5,), std=(0.5,), num_workers=0,
)


def run_demo(output_dir: str | Path, device: str = "cpu", epochs: int | None = None, threads: int | None = 1,
             bench_iters: int = 10, progress: bool = True) -> dict[str, Any]:
    from ..engine.config import make_config
    from ..engine.evaluate import evaluate_checkpoint
    from ..engine.report import write_json
    from ..engine.train import train
    from ..reduce import METHODS
    from ..reduce.registry import sequence_methods

    if threads:
        torch.set_num_threads(threads)  # tiny ops: one thread avoids oversubscription on a busy machine
    out = Path(output_dir)
    run_dir = out / "demo_run"
    # the demo's own run folders are replaced by a new demo (the old run's files are listed as they go)
    overrides: dict[str, Any] = {"output_dir": str(run_dir), "device": device, "progress": progress,
                                 "existing_output": "overwrite"}
    if epochs is not None:
        overrides["epochs"] = epochs
    cfg = make_config(DEMO_RECIPE, overrides)
    t0 = time.time()
    summary = train(cfg)
    train_s = time.time() - t0
    checkpoint = str(run_dir / "last.pth")

    rows: list[dict[str, Any]] = []
    specs: list[tuple[str, str | None, dict[str, Any]]] = [("dense", None, {})]
    specs += [(name, name, dict(METHODS[name].demo_options)) for name in sequence_methods()]  # the demo is a Vim
    for label, method, options in specs:
        eval_cfg = make_config(DEMO_RECIPE, overrides, {"method": method, "method_opts": options})
        try:
            weights = checkpoint
            if method is not None and METHODS[method].learned:
                weights = _finetune_learned(DEMO_RECIPE, overrides, method, options, checkpoint, out)
            res = evaluate_checkpoint(eval_cfg, weights, bench_batch=64, bench_iters=bench_iters)
            rows.append({"method": label, "options": options, "top1": res["top1"], "gflops": res["gflops"],
                         "img_per_s": res["img_per_s"], "error": None,
                         "finetuned_epochs": FINETUNE_EPOCHS if weights != checkpoint else 0})
        except (ValueError, RuntimeError, TypeError) as err:
            rows.append({"method": label, "options": options, "top1": None, "gflops": None, "img_per_s": None,
                         "error": f"{type(err).__name__}: {err}"})
    result = {"train_seconds": train_s, "train_summary": summary, "rows": rows,
              "threads": torch.get_num_threads(), "device": device}
    write_json(out / "demo_results.json", result)
    result["plot"] = str(plot_tradeoff(rows, out / "demo_tradeoff.png"))
    result["table"] = format_table(rows)
    return result


FINETUNE_EPOCHS = 3


def _finetune_learned(recipe: dict[str, Any], overrides: dict[str, Any], method: str, options: dict[str, Any],
                      dense_checkpoint: str, out: Path) -> str:
    """A method with learned parts (e.g. DyVM's predictors) is useless untrained: fine-tune it briefly from the
    dense model, distilling from it, as its recipe does (a few epochs here, 30 in the paper)."""
    from ..engine.config import make_config
    from ..engine.train import train

    run_dir = out / f"demo_run_{method}"
    cfg = make_config(recipe, overrides, {
        "method": method, "method_opts": options, "finetune": dense_checkpoint, "teacher": dense_checkpoint,
        "epochs": FINETUNE_EPOCHS, "eval_every": FINETUNE_EPOCHS, "lr": 5e-4, "warmup_epochs": 0,
        "output_dir": str(run_dir)})
    train(cfg)
    return str(run_dir / "last.pth")


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<16} {'top-1 %':>8} {'MFLOPs':>8} {'img/s':>9}  options",
             "-" * 72]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['method']:<16} {'failed':>8} {'':>8} {'':>9}  {r['error'][:60]}")
            continue
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        if r.get("finetuned_epochs"):
            opts += f" (fine-tuned {r['finetuned_epochs']} epochs)"
        lines.append(f"{r['method']:<16} {r['top1']:8.2f} {r['gflops'] * 1e3:8.2f} {r['img_per_s']:9.0f}  {opts}")
    return "\n".join(lines)


def plot_tradeoff(rows: list[dict[str, Any]], path: str | Path,
                  title: str = "Vim on the bundled digits: reduction methods, accuracy vs cost") -> Path:
    """Accuracy vs FLOPs (left) and vs measured img/s (right), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r["error"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "gflops", "MFLOPs per image (paper convention)"),
                           (axes[1], "img_per_s", "measured images / s")):
        markers = "o^sDvP<>Xh"
        for i, r in enumerate(ok):
            x = r[key] * 1e3 if key == "gflops" else r[key]
            dense = r["method"] == "dense"
            ax.scatter([x], [r["top1"]], s=160 if dense else 50, marker="*" if dense else markers[i % len(markers)],
                       color="black" if dense else None, zorder=3, label=r["method"], alpha=0.85)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    if ok:
        accs = [r["top1"] for r in ok]
        lo = math.floor(min(accs) - 2)
        for ax in axes:
            ax.set_ylim(max(0, lo), min(100.5, max(accs) + 2))
    if ok:
        axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
