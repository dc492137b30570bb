"""Video data: TSN sampling against its rule, clip-consistent crops, multi-view evaluation crops, unreadable
files skipped and counted, the bundled moving shapes, and one-line errors for bad input."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from mambatrim.data import DataError, DataOptions, build_data  # noqa: E402
from mambatrim.data.video import (ClipOptions, ClipTransform, UnreadableVideoWarning, eval_indices,  # noqa: E402
                                  read_frames, require_av, train_indices, video_splits)
from mambatrim.data.video_synth import class_names, make_moving_shapes, render_clip, write_video  # noqa: E402


def tsn_segment_frames(total: int, num_frames: int, segment: int) -> range:
    """The TSN rule written out in integers: segment s of n spans frames floor(s * total / n) up to
    floor((s + 1) * total / n) - 1, and at least its first frame when segments are shorter than a frame."""
    first = segment * total // num_frames
    return range(first, max(first, (segment + 1) * total // num_frames - 1) + 1)


@pytest.mark.parametrize("total,num_frames", [(300, 8), (16, 8), (17, 8), (9, 4), (64, 16)])
def test_training_draws_one_frame_per_segment_covering_each_segment(total, num_frames):
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(400 if total < 100 else 40):
        picked = train_indices(total, num_frames, gen)
        assert len(picked) == num_frames
        assert all(i in tsn_segment_frames(total, num_frames, s) for s, i in enumerate(picked))
        seen.update(picked)
    if total < 100:  # every frame of every segment is drawn at some point (uniform within the segment)
        assert seen == set(range(total))


def test_fewer_frames_than_segments_repeat_frames_in_order():
    # 5 frames, 8 segments of 0.625 frames: segment s holds frame floor(0.625 s)
    assert train_indices(5, 8) == [0, 0, 1, 1, 2, 3, 3, 4]
    assert eval_indices(5, 8, 1) == [[0, 0, 1, 2, 2, 3, 4, 4]]  # segment centres 0.3125 + 0.625 s


def test_evaluation_clips_tile_each_segment():
    # 32 frames, 8 segments of 4: 2 clips take offsets 1 and 3 of each segment, 1 clip the centre (2)
    assert eval_indices(32, 8, 2) == [[4 * s + 1 for s in range(8)], [4 * s + 3 for s in range(8)]]
    assert eval_indices(32, 8, 1) == [[4 * s + 2 for s in range(8)]]
    for total, n, clips in [(300, 8, 4), (17, 8, 3), (64, 16, 2)]:  # clip k: (s + (k + 1/2) / clips) segments
        expected = [[(2 * clips * s + 2 * k + 1) * total // (2 * n * clips) for s in range(n)] for k in range(clips)]
        assert eval_indices(total, n, clips) == expected


def test_random_resized_crop_and_flip_are_the_same_for_every_frame():
    # frame t = base + 10 t: a crop + resize (linear) + flip shared by all frames keeps the difference to frame 0
    # exactly 10 t everywhere; a per-frame crop or flip would not
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 150, (1, 3, 40, 56), dtype=torch.uint8, generator=gen)
    frames = base + 10 * torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1)
    opts = ClipOptions(num_frames=6, size=24, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), min_scale=0.2)
    transform = ClipTransform(opts, train=True)
    outputs = []
    for seed in range(8):
        torch.manual_seed(seed)
        clip = transform(frames)
        assert clip.shape == (3, 6, 24, 24)
        step = (clip - clip[:, :1]) * 255
        expected = 10 * torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1).expand_as(step)
        torch.testing.assert_close(step, expected, atol=1e-3, rtol=0)
        outputs.append(clip[:, 0])
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])  # the crop does vary between draws


def test_three_evaluation_crops_span_the_long_side():
    frames = torch.arange(2 * 3 * 20 * 40, dtype=torch.float32).view(2, 3, 20, 40) % 251
    frames = frames.to(torch.uint8)
    opts = ClipOptions(num_frames=2, size=20, crops=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    views = ClipTransform(opts, train=False).crops(frames)  # short side already 20: no resize
    for view, left in zip(views, (0, 10, 20)):
        torch.testing.assert_close(view * 255, frames[..., left:left + 20].permute(1, 0, 2, 3).float())


def _write_set(root, per_class=3, frames=6, size=16, bad=()):
    (root / "videos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = {"train": [], "val": []}
    for label in range(2):
        for i in range(per_class):
            name = f"videos/c{label}_{i}.mp4"
            write_video(root / name, render_clip(label, frames, size, rng))
            lines["val" if i == 0 else "train"].append(f"{name} {label}")
    for name, split in bad:  # a file of garbage, or (named missing*) no file at all
        if "missing" not in name:
            (root / name).write_bytes(b"\x00not a video" * 10)
        lines[split].append(f"{name} 1")
    for split, rows in lines.items():
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_read_frames_returns_the_picked_frames_in_order(tmp_path):
    video = render_clip(3, 8, 16, np.random.default_rng(2))
    write_video(tmp_path / "v.mp4", video)
    stack, rows = read_frames(tmp_path / "v.mp4", lambda total: [total - 1, 2, 2, 0])
    assert stack.shape == (3, 3, 16, 16) and rows == [2, 1, 1, 0]
    decoded = stack[rows].permute(0, 2, 3, 1).float()
    error = (decoded - torch.from_numpy(video[[7, 2, 2, 0]]).float()).abs().mean()
    assert error < 12  # lossy codec, the right frames (others differ by the shape's motion)


def test_unreadable_files_are_skipped_counted_and_the_epoch_completes(tmp_path):
    root = _write_set(tmp_path, per_class=4, bad=[("videos/corrupt.mp4", "train"), ("videos/broken.mp4", "val"),
                                                        ("videos/missing.mp4", "train")])
    opts = DataOptions(data_path=str(root), task="video", num_frames=4, input_size=16, batch_size=2,
                       num_workers=0, video_flip=False, test_clips=2)
    bundle = build_data(opts, torch.device("cpu"))
    assert bundle.train_size == 8 and bundle.val_size == 3 and bundle.num_classes == 2
    bundle.train.set_epoch(0)
    with pytest.warns(UnreadableVideoWarning) as caught:
        batches = list(bundle.train)
    named = " ".join(str(w.message) for w in caught)
    assert "corrupt.mp4" in named and "missing.mp4" in named
    assert len(batches) == 4 and all(x.shape == (2, 3, 4, 16, 16) for x, _ in batches)  # retried: full batches
    per_file = [w for w in caught if str(w.message).startswith("skipping unreadable video")]
    assert bundle.train.skipped == len(per_file) >= 2  # every encounter (a retry may meet the other bad file)
    with pytest.warns(UnreadableVideoWarning, match="broken.mp4"):
        val = list(bundle.val)
    assert sum(len(y) for _, y in val) == 2 and bundle.val.skipped == 1  # dropped, not replaced
    assert val[0][0].shape[1:] == (2, 3, 4, 16, 16)  # 2 clips x 1 crop views


def test_worker_processes_report_their_skips(tmp_path):
    root = _write_set(tmp_path, per_class=3, bad=[("videos/corrupt.mp4", "train")])
    opts = DataOptions(data_path=str(root), task="video", num_frames=2, input_size=16, batch_size=5,
                       num_workers=1)
    bundle = build_data(opts, torch.device("cpu"))
    bundle.train.set_epoch(0)
    with pytest.warns(UnreadableVideoWarning):
        batches = list(bundle.train)
    assert len(batches) == 1 and bundle.train.skipped == 1


def test_class_folder_layout_and_list_errors(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            write_video(tmp_path / split / cls / "x.mp4", render_clip(0, 4, 16, rng))
    train, val, classes = video_splits(tmp_path)
    assert classes == ["a", "b"] and [y for _, y in train] == [0, 1] and len(val) == 2
    bad = tmp_path / "lists"
    bad.mkdir()
    (bad / "train.csv").write_text("a.mp4 0\nb.mp4 zero\n")
    (bad / "val.csv").write_text("a.mp4 0\n")
    with pytest.raises(DataError, match=r"train.csv:2: expected 'path label'"):
        video_splits(bad)
    with pytest.raises(DataError, match="is not a folder"):
        video_splits(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown task 'audio'"):
        build_data(DataOptions(task="audio"), torch.device("cpu"))


def test_missing_pyav_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(DataError, match=r"needs PyAV: pip install 'mambatrim\[video\]'"):
        require_av()


def test_moving_shapes_class_is_shape_and_direction(tmp_path):
    root = make_moving_shapes(tmp_path / "set", per_class=2, frames=8, size=32)
    train, val, classes = video_splits(root)
    assert classes == class_names() and len(classes) == 10 and len(train) + len(val) == 20
    for path, label in train + val:
        stack, rows = read_frames(path, lambda total: range(total))
        assert len(rows) == 8
        bright = stack.float().mean(1) > 90  # the shape (colour channels >= 96) vs the background (< 64 + noise)
        cols = torch.arange(32).float()
        centre = [(bright[t].float().sum(0) * cols).sum() / bright[t].sum() for t in (0, 7)]
        moved = float(centre[1] - centre[0])
        assert (moved > 2) if classes[label].endswith("right") else (moved < -2), (path, moved)
