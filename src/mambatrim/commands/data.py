"""``mambatrim data``: make the bundled data sets ahead of their first use (``make-video``: the moving-shapes
videos), and describe a video folder."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  mambatrim data make-video                       # the bundled set, into the user cache (what 'moving-shapes' reads)
  mambatrim data make-video --output-dir shapes --per-class 100 --frames 32 --size 64
  mambatrim data describe-video shapes            # classes, clips per split, frames and size of the first clip
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("data", help="make the bundled video set, describe a video folder",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    make = sub.add_parser("make-video", help="write the moving-shapes videos (10 classes = 5 shapes x 2 directions)")
    make.add_argument("--output-dir", "--output_dir", default=None,
                      help="a new folder for the set (default: the user cache, where --data-path moving-shapes looks)")
    make.add_argument("--per-class", type=int, default=40, help="clips per class (default 40; a quarter for val)")
    make.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    make.add_argument("--size", type=int, default=32, help="frame side in pixels (default 32, even)")
    make.set_defaults(func=make_video)
    describe = sub.add_parser("describe-video", help="classes and clips of a video folder (csv lists or class "
                                                     "folders)")
    describe.add_argument("path", help="a video folder, or moving-shapes")
    describe.set_defaults(func=describe_video)


def make_video(args: argparse.Namespace) -> int:
    from ..data.video_synth import make_moving_shapes, moving_shapes
    from ..validation import check

    for value, option in ((args.per_class, "--per-class"), (args.frames, "--frames"), (args.size, "--size")):
        check(value, option, "positive_int")
    if args.size % 2 or args.size < 16:
        raise ValueError(f"--size must be an even number >= 16 (the codec's 4:2:0 chroma), got {args.size}")
    if args.per_class < 2:
        raise ValueError(f"--per-class must be >= 2 (one for val, one for train), got {args.per_class}")
    if args.output_dir is None:
        folder = moving_shapes(per_class=args.per_class, frames=args.frames, size=args.size)
    else:
        folder = Path(args.output_dir)
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"--output-dir {folder} is not empty")
        make_moving_shapes(folder, args.per_class, args.frames, args.size)
    print(f"moving shapes: {folder}")
    return describe_video(argparse.Namespace(path=str(folder)))


def describe_video(args: argparse.Namespace) -> int:
    from ..data.video import read_frames, video_splits
    from ..data.video_loader import video_root

    root, _ = video_root(args.path)
    train, val, classes = video_splits(root)
    seen: list[int] = []
    frames, _ = read_frames(train[0][0], lambda total: seen.append(total) or [total - 1])
    print(f"{len(classes)} classes ({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}); "
          f"{len(train)} train / {len(val)} val clips; first clip {train[0][0]}: {seen[-1]} frames of "
          f"{frames.shape[-1]}x{frames.shape[-2]}")
    return 0
