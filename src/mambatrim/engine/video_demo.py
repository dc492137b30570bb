"""``mambatrim demo --task video``: a small VideoMamba trained on the bundled moving shapes (CPU, minutes), then
dense vs R-MeeTo (training-free, and re-trained briefly) vs DyVM (fine-tuned briefly): top-1 over 2 clips per
video, FLOPs and clips/s in a table, a JSON file and a trade-off plot."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

# The demo recipe (configs/videomamba_video_moving_shapes.yaml holds the same settings): 8 frames of 2 x 2 patches
# (16 px of 32 px frames), 33 tokens. Few tokens on purpose: trained from scratch with the official initialisation
# (every Linear bias zero, dt_proj's included: short scan memory), a small model relays information to the class
# token at the front over a short sequence only.
VIDEO_RECIPE: dict[str, Any] = dict(
    model="videomamba_video_tiny", model_kwargs={"embed_dim": 64, "depth": 4, "patch_size": 16}, task="video",
    data_path="moving-shapes", num_frames=8, test_clips=2, test_crops=1, video_flip=False, video_min_scale=0.6,
    batch_size=16, epochs=15, eval_every=5, lr=3e-3, unscale_lr=True, min_lr=1e-5, warmup_epochs=1, warmup_lr=1e-5,
    weight_decay=0.05, drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, num_workers=1,
)
# (row label, method, options, re-trained: a few epochs from the dense model, distilling from it, as
# engine.demo fine-tunes learned methods; otherwise training-free)
VIDEO_ROWS: list[tuple[str, str | None, dict[str, Any], bool]] = [
    ("dense", None, {}, False),
    ("rmeeto", "rmeeto", {"r": 6, "layers": [1, 2, 3]}, False),
    ("rmeeto re-trained", "rmeeto", {"r": 6, "layers": [1, 2, 3]}, True),
    ("dyvm", "dyvm", {"keep": 0.7, "block_ratio": 0.8, "layers": [2]}, True),
]


def run_video_demo(output_dir: str | Path, device: str = "cpu", epochs: int | None = None, threads: int | None = 1,
                   bench_iters: int = 5, progress: bool = True) -> dict[str, Any]:
    from .config import make_config
    from .demo import FINETUNE_EPOCHS, _finetune_learned, format_table, plot_tradeoff
    from .evaluate import evaluate_checkpoint
    from .report import write_json
    from .train import train

    if threads:
        torch.set_num_threads(threads)
    out = Path(output_dir)
    base = {"output_dir": str(out / "video_demo_run"), "device": device, "progress": progress,
            "existing_output": "overwrite"}
    if epochs is not None:
        base["epochs"] = epochs
    start = time.time()
    summary = train(make_config(VIDEO_RECIPE, base))
    train_s = time.time() - start
    dense = str(out / "video_demo_run" / "last.pth")
    rows = []
    for label, method, options, retrain in VIDEO_ROWS:
        weights = _finetune_learned(VIDEO_RECIPE, base, method, options, dense, out) if retrain else dense
        res = evaluate_checkpoint(make_config(VIDEO_RECIPE, base, {"method": method, "method_opts": options}),
                                  weights, bench_batch=16, bench_iters=bench_iters)
        rows.append({"method": label, "options": options, "top1": res["top1"], "gflops": res["gflops"],
                     "gflops_full": res["gflops_full"], "img_per_s": res["img_per_s"], "error": None,
                     "finetuned_epochs": FINETUNE_EPOCHS if retrain else 0})
    result = {"train_seconds": train_s, "train_summary": summary, "rows": rows, "threads": torch.get_num_threads(),
              "device": device, "recipe": VIDEO_RECIPE}
    write_json(out / "video_demo_results.json", result)
    result["plot"] = str(plot_tradeoff(rows, out / "video_demo_tradeoff.png",
                                       title="VideoMamba on the bundled moving shapes: accuracy vs cost (per clip)"))
    result["table"] = format_table(rows).replace("img/s", "clips/s")
    return result
