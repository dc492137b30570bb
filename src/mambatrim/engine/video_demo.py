"""``mambatrim demo --task video``: a small VideoMamba trained on the bundled moving shapes (CPU, minutes), then
dense vs R-MeeTo (training-free, and re-trained briefly) vs DyVM (fine-tuned briefly): top-1 over 2 clips per
video, FLOPs and clips/s relative to dense in a table, a JSON file and a trade-off plot, through the image demo's
machinery (:func:`~mambatrim.engine.demo.run_demo` with :data:`VIDEO_DEMO`)."""
from __future__ import annotations

from typing import Any

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
_RMEETO = {"r": 6, "layers": [1, 2, 3]}
# dense; R-MeeTo training-free and re-trained briefly (distilling from dense, as engine.demo re-trains); DyVM
# fine-tuned briefly (its predictors are useless untrained)
VIDEO_DEMO = DemoTask(
    VIDEO_RECIPE,
    (Variant("dense"), Variant("rmeeto", "rmeeto", _RMEETO),
     Variant("rmeeto re-trained", "rmeeto", _RMEETO, retrain=True),
     Variant("dyvm fine-tuned", "dyvm", {"keep": 0.7, "block_ratio": 0.8, "layers": [2]}, retrain=True)),
    stem="video_demo",
    title="VideoMamba on the bundled moving shapes (33 tokens a clip): accuracy vs work and speed",
)
