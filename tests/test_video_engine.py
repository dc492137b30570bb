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
