"""FLOPs counter: the published Vim figures, a hand count, and reduced models counted from what ran."""
from __future__ import annotations

import pytest
import torch

import mambatrim
from mambatrim.analysis import count_flops
from mambatrim.reduce import MixerContext, Reducer


def meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return mambatrim.create_model(name, **kwargs)


@pytest.mark.parametrize("name, paper, full", [
    ("vim_tiny_patch16_224", 1.45, 1.82),
    ("vim_small_patch16_224", 5.08, 5.91),
    ("vim_base_patch16_224", 18.87, 20.89),
])
def test_published_figures(name, paper, full):
    report = count_flops(meta_model(name))
    assert round(report.gflops("paper"), 2) == paper  # DyVM / R-MeeTo convention, as published
    assert round(report.gflops("full"), 2) == full  # both scan directions
    assert [layer.tokens for layer in report.layers] == [197] * 24


# Hand count for depth 1, width 16 (E=32, dt_rank 1, d_state 16, d_conv 4), 32x32 input: 4 patches + cls = 5.
SHARED = 5 * 16 * 64 + 5 * 32 * 16  # in_proj + out_proj
PER_DIR = 8 * 32 * 4 + 5 * 32 * 33 + 5 * 1 * 32 + 9 * 5 * 32 * 16 + 2 * 5 * 32  # conv, x_proj, dt_proj, scan
EMBED_HEAD = 4 * 16 * 3 * 16 * 16 + 16 * 10


def test_hand_count_tiny_config():
    model = mambatrim.create_model("vim_tiny_patch16_224", depth=1, embed_dim=16, num_classes=10, img_size=32)
    report = count_flops(model)
    assert report.total("paper") == EMBED_HEAD + SHARED + PER_DIR == 86816
    assert report.total("full") == EMBED_HEAD + SHARED + 2 * PER_DIR
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.total("paper") == count_flops(meta_model("vim_tiny_patch16_224", depth=1, embed_dim=16,
                                                           num_classes=10, img_size=32)).total("paper")
    with pytest.raises(ValueError, match="unknown FLOPs convention"):
        report.total("fvcore")


class DropTailAndGate(Reducer):
    """Layer 0: sample 1 skips the backward scan; before layer 1: keep 3 of the 5 tokens."""

    def before_layer(self, layer_idx, state):
        if layer_idx != 1:
            return state
        keep = torch.arange(3).expand(state.hidden.shape[0], 3)
        return state.gather(keep)  # the class token (index 2) is kept in place

    def mixer_context(self, layer_idx, state):
        if layer_idx == 0:
            return MixerContext(direction_gate=torch.tensor([[1.0, 1.0], [1.0, 0.0]]), skip_gated=True)
        return None

    def flops_overhead(self, tokens_per_layer, dim):
        return 1000.0 * len(tokens_per_layer)


def test_reduced_model_counts_tokens_and_directions_that_ran():
    model = mambatrim.create_model("vim_tiny_patch16_224", depth=2, embed_dim=16, num_classes=10, img_size=32)
    model.set_reducer(DropTailAndGate()).train()
    report = count_flops(model, batch=2)
    assert model.training  # mode restored
    assert report.tokens_per_layer == [5, 3]
    assert report.layers[0].directions == (1.0, 0.5)
    assert report.layers[1].directions == (1.0, 1.0)
    shared3 = 3 / 5 * SHARED
    per_dir3 = 6 * 32 * 4 + 3 * 32 * 33 + 3 * 32 + 9 * 3 * 32 * 16 + 2 * 3 * 32
    assert report.reducer == 2000.0
    assert report.total("paper") == pytest.approx(EMBED_HEAD + 2000 + SHARED + 0.75 * PER_DIR + shared3 + per_dir3)
    assert report.total("full") == pytest.approx(EMBED_HEAD + 2000 + SHARED + 1.5 * PER_DIR + shared3 + 2 * per_dir3)
    assert "total: paper" in report.table()
    assert report.to_dict()["layers"][1]["tokens"] == 3


def test_gate_without_skipping_counts_both_directions():
    class Multiply(DropTailAndGate):
        def before_layer(self, layer_idx, state):
            return state

        def mixer_context(self, layer_idx, state):
            return MixerContext(direction_gate=torch.tensor([[1.0, 0.0]]), skip_gated=False)

    model = mambatrim.create_model("vim_tiny_patch16_224", depth=1, embed_dim=16, num_classes=10, img_size=32)
    report = count_flops(model.set_reducer(Multiply()))
    assert report.layers[0].directions == (1.0, 1.0)  # both computed, then multiplied: both count


def test_other_sizes_and_bad_sizes():
    report = count_flops(meta_model("vim_tiny_patch16_224"), img_size=384)
    assert report.tokens_per_layer[0] == 577
    with pytest.raises(ValueError, match="cannot be tiled"):
        count_flops(meta_model("vim_tiny_patch16_224", depth=1), img_size=100)


class FourPathFamily(torch.nn.Module):
    """A non-Vim backbone: conv stem, one 2-path mixer whose papers count both paths, mean-pooled head."""

    input_size = (3, 16, 16)

    def __init__(self):
        super().__init__()
        from mambatrim.models.mamba import MultiPathMixer

        class BothCounted(MultiPathMixer):
            paper_paths = 2

        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.mixer = BothCounted(8, combine="sum", d_state=4)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.mixer(tokens).mean(1))


def test_any_backbone_counts_leaves_and_mixers_by_their_terms():
    report = count_flops(FourPathFamily())
    L, d, E, N, R, K = 16, 8, 16, 4, 1, 4  # 4x4 grid of tokens; d_inner 16, dt_rank ceil(8/16)
    per_path = (L + K - 1) * E * K + L * E * (R + 2 * N) + L * R * E + 9 * L * E * N + 2 * L * E
    shared = L * d * 2 * E + L * E * d
    assert report.modules == {"stem": 16 * 8 * 3 * 4 * 4, "head": 8 * 5}
    assert report.tokens_per_layer == [16]
    assert report.total("paper") == report.total("full") == 16 * 8 * 3 * 16 + 40 + shared + 2 * per_path
    with torch.device("meta"):
        assert count_flops(FourPathFamily(), img_size=32).tokens_per_layer == [64]
