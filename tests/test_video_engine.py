"""The video task in the engine: multi-view logits averaged per video, cutmix boxes shared by a clip's frames,
the video options checked."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mambatrim.engine.config import make_config
from mambatrim.engine.evaluate import view_averaged_logits
from mambatrim.engine.train import mix_clips


class TinyClipNet(nn.Module):
    """A non-linear clip classifier (so averaging logits differs from averaging inputs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(3 * 2 * 4 * 4, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 5
        return self.fc2(torch.relu(self.fc1(x.flatten(1))) ** 2)


def test_multi_view_logits_are_the_mean_of_each_videos_views():
    model = TinyClipNet()
    views = torch.randn(3, 6, 3, 2, 4, 4)  # 3 videos x (2 clips x 3 crops)
    got = view_averaged_logits(model, views)
    expected = torch.stack([torch.stack([model(views[b, v:v + 1])[0] for v in range(6)]).mean(0) for b in range(3)])
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, model(views.mean(1)))  # logits averaged, not inputs
    single = torch.randn(2, 3, 2, 4, 4)
    torch.testing.assert_close(view_averaged_logits(model, single), model(single))


def test_cutmix_on_clips_cuts_the_same_box_from_every_frame():
    from timm.data import Mixup

    mix = mix_clips(Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, num_classes=4, label_smoothing=0.0))
    bsz, frames = 4, 5
    for seed in range(5):
        torch.manual_seed(seed)
        x = (100.0 * torch.arange(bsz).view(-1, 1, 1, 1, 1) + torch.arange(frames).view(1, 1, -1, 1, 1)).expand(
            bsz, 3, frames, 16, 16).contiguous()
        original = x.clone()
        mixed, targets = mix(x, torch.arange(bsz))
        assert mixed.shape == original.shape and targets.shape == (bsz, 4)
        changed = mixed != original
        box = changed[:, :1, :1]  # sample-wise box of channel 0, frame 0 ...
        assert torch.equal(changed, box.expand_as(changed))  # ... is the box of every channel and frame
        # the pasted pixels come from the same frame of the partner clip (the batch flipped) ...
        assert torch.equal(mixed[changed], original.flip(0)[changed])
        # ... over the share of each frame's H x W that the soft target gives the partner
        share = changed[:, 0].float().mean((1, 2, 3))
        torch.testing.assert_close(share, targets[torch.arange(bsz), torch.arange(bsz).flip(0)])


def test_video_options_are_checked():
    cfg = make_config({"task": "video", "num_frames": 16, "test_clips": 4, "test_crops": 3})
    assert (cfg.task, cfg.num_frames, cfg.test_clips, cfg.test_crops) == ("video", 16, 4, 3)
    with pytest.raises(ValueError, match="task must be one of image, video, got 'audio'"):
        make_config({"task": "audio"})
    with pytest.raises(ValueError, match="num_frames must be an integer >= 1, got 0"):
        make_config({"task": "video", "num_frames": 0})
    with pytest.raises(ValueError, match="model_kwargs num_frames=8 but the data samples num_frames=16"):
        make_config({"task": "video", "num_frames": 16, "model_kwargs": {"num_frames": 8}})


def test_train_and_eval_a_video_model_end_to_end(tmp_path):
    """The training loop on encoded videos: a tiny VideoMamba for two epochs on a 2-class set (one unreadable
    file among them), then ``mambatrim eval``'s path with 2 clips x 3 crops per video."""
    pytest.importorskip("av")
    from mambatrim.engine.evaluate import evaluate_checkpoint
    from mambatrim.engine.train import train
    from test_video_data import _write_set

    root = _write_set(tmp_path / "videos", per_class=4, frames=6, size=16, bad=[("videos/corrupt.mp4", "train")])
    recipe = dict(model="videomamba_video_tiny", model_kwargs={"embed_dim": 16, "depth": 1, "patch_size": 8},
                  task="video", data_path=str(root), num_frames=2, input_size=16, batch_size=2, epochs=2,
                  num_workers=0, lr=1e-3, warmup_epochs=0, mixup=0.8, cutmix=1.0, video_flip=False, device="cpu",
                  progress=False, output_dir=str(tmp_path / "run"), test_clips=2, test_crops=3, drop_path=0.0)
    with pytest.warns(UserWarning, match="corrupt.mp4"):
        summary = train(make_config(recipe))
    assert summary["epochs_done"] == 2 and summary["global_step"] == 2 * 3  # 7 clips (the bad one retried), batch 2
    assert summary["train_images"] == 7 and summary["gflops_full"] > summary["gflops"] > 0
    assert (tmp_path / "run" / "last.pth").is_file()
    result = evaluate_checkpoint(make_config(recipe), str(tmp_path / "run" / "last.pth"), throughput=True,
                                 bench_batch=2, bench_iters=1)
    assert result["num_images"] == 2 and 0 <= result["top1"] <= 100  # the two val videos, 6 views each
    assert result["gflops_full"] > result["gflops"] > 0 and result["img_per_s"] > 0
