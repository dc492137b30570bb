"""``mambatrim visualize``: what a reduction method does to each image, as PNG grids like the papers' figures.

Kept tokens per stage (DyVM), merged groups coloured by their destination token (R-MeeTo), importance scores and
pruned positions (ToP and the pruning baselines), and the scan directions run per block for each image (DyVM's
block selection). The images come from ``--images`` (an image file or a folder of images) or else the evaluation
split of the data (the checkpoint's, ``--data-path``, or the bundled digits).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from .train import EVAL_KEYS, add_config_arguments, config_from_args

EXAMPLES = """examples:
  mambatrim visualize --checkpoint demo_run/last.pth --method rmeeto --method-opt ratio=0.35 \\
      --method-opt layers=[1,2,3] --out docs/visualize
  mambatrim visualize --checkpoint demo_run_dyvm_fine-tuned/last.pth --out vis     (the method it was trained with)
  mambatrim visualize --model vim_tiny_patch16_224 --method top --images cat.jpg --out vis   (random weights)
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("visualize", help="PNG grids of the tokens a method keeps, merges and scores",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", "--ckpt", help="weights (a mambatrim checkpoint carries its model, data "
                                                       "and method; default: a fresh model)")
    parser.add_argument("--images", help="an image file or a folder of images (default: the evaluation data)")
    parser.add_argument("--num-images", type=int, default=4, help="images to draw (default 4)")
    parser.add_argument("--out", default="visualize", help="folder for the PNG files (default ./visualize)")
    parser.add_argument("--stem", default=None, help="file name prefix (default: the method's name)")
    add_config_arguments(parser, EVAL_KEYS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.visualize import visualize
    from ..engine.demo import build_eval_model, load_eval_data
    from ..engine.evaluate import config_from_checkpoint
    from ..models.checkpoint import read_checkpoint
    from ..validation import check

    check(args.num_images, "--num-images", "positive_int")
    base = config_from_checkpoint(read_checkpoint(args.checkpoint)) if args.checkpoint else {}
    cfg = config_from_args(args, {"data_path": "digits", "in_chans": 1, "input_size": 32, **base})
    if not cfg.method:
        raise ValueError("no method to visualise: give --method NAME (e.g. rmeeto, dyvm, top) or a checkpoint "
                         "trained with one")
    data = load_eval_data(cfg)
    model = build_eval_model(cfg, data, args.checkpoint)
    if args.images:
        images = load_images(args.images, data.input_size, data.in_chans, cfg.mean, cfg.std)
    else:
        images = data.bench_images
    images = images[:args.num_images].to(data.device)
    paths = visualize(model, images, args.out, args.stem or cfg.method)
    for path in paths:
        print(path)
    return 0


def load_images(path: str, size: int, in_chans: int, mean: Any, std: Any) -> torch.Tensor:
    """An image file or a folder of them -> (N, C, size, size) normalised like the model's training data."""
    from ..data.datasets import IMAGE_EXTENSIONS, ToUint8, decode_image

    root = Path(path)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if root.is_dir() else [root]
    if not root.exists() or not files:
        raise ValueError(f"--images {path}: no such image file or folder of images ({', '.join(IMAGE_EXTENSIONS)})")
    to_tensor = ToUint8(size)
    x = torch.stack([to_tensor(decode_image(str(f), str(f), "L" if in_chans == 1 else "RGB")) for f in files])
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).reshape(shape)
    std_t = torch.tensor(std, dtype=torch.float32).reshape(shape)
    return (x.float() / 255 - mean_t) / std_t
