"""``mambatrim demo --task video``: a small VideoMamba trained on the bundled moving shapes (CPU, minutes), then
dense vs R-MeeTo (training-free, and re-trained briefly; sequence and temporal pairing at the same r) vs DyVM
(fine-tuned briefly): top-1 over 2 clips per video, FLOPs and clips/s relative to dense in a table, a JSON file and
a trade-off plot, through the image demo's machinery (:func:`~mambatrim.engine.demo.run_demo` with
:data:`VIDEO_DEMO`). :data:`VIDEO_GPU_DEMO` is the same on a GPU at 513 tokens a clip
(``benchmarks/video_gpu.py``)."""
from __future__ import annotations

from typing import Any

import torch

from .demo import DemoTask, Variant

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


def rmeeto_rows(options: dict[str, Any]) -> tuple[Variant, ...]:
    """R-MeeTo training-free and re-trained briefly, with the sequence pairing (the paper's) and with the
    temporal one (ours: the same location in adjacent frames) at the same options."""
    temporal = {**options, "pairing": "temporal"}
    return (Variant("rmeeto", "rmeeto", options), Variant("rmeeto re-trained", "rmeeto", options, retrain=True),
            Variant("rmeeto temporal", "rmeeto", temporal),
            Variant("rmeeto temporal re-trained", "rmeeto", temporal, retrain=True))


# dense; R-MeeTo training-free and re-trained briefly (distilling from dense, as engine.demo re-trains); DyVM
# fine-tuned briefly (its predictors are useless untrained)
VIDEO_DEMO = DemoTask(
    VIDEO_RECIPE,
    (Variant("dense"), *rmeeto_rows({"r": 6, "layers": [1, 2, 3]}),
     Variant("dyvm fine-tuned", "dyvm", {"keep": 0.7, "block_ratio": 0.8, "layers": [2]}, retrain=True)),
    stem="video_demo",
    title="VideoMamba on the bundled moving shapes (33 tokens a clip): accuracy vs work and speed",
)

# The GPU-sized run (one GPU, a few minutes): VideoMamba-Ti's width, 12 blocks, 8 frames of 8 x 8 patches (4 px
# of 32 px frames): 513 tokens a clip; bf16 training (the engine's default on CUDA) and bf16 timing with CUDA
# graphs; R-MeeTo at the paper's ratio 0.31 (r = 64 before blocks 2, 4, ..., 10, both pairings), DyVM keep 0.7 and
# block ratio 0.8 at its default layers (3, 6, 9).
VIDEO_GPU_RECIPE: dict[str, Any] = dict(
    VIDEO_RECIPE, model_kwargs={"embed_dim": 192, "depth": 12, "patch_size": 4}, batch_size=16,
    eval_batch_size=128, epochs=50, eval_every=25, lr=1e-3, warmup_epochs=2, num_workers=8,
)
VIDEO_GPU_DEMO = DemoTask(
    VIDEO_GPU_RECIPE,
    (Variant("dense"), *rmeeto_rows({"ratio": 0.31}),
     Variant("dyvm fine-tuned", "dyvm", {"keep": 0.7, "block_ratio": 0.8}, retrain=True)),
    stem="video_gpu",
    title="VideoMamba (192-dim, 12 blocks, 513 tokens a clip) on the bundled moving shapes, one GPU",
    bench_dtype=torch.bfloat16,
)
