"""Segmentation model: dense output shape, exact identity at no reduction, and the restoration rules (pruned
tokens frozen at their pruning layer, merged tokens unmerged to their destination) checked against a reference
written out here from the recorded token states."""
from __future__ import annotations

import pytest
import torch

from mambatrim.contract import Reducer, TokenState
from mambatrim.contract.dense import DENSE_TAPS, DenseRestore
from mambatrim.models.segmentation import create_segmentation_model
from mambatrim.reduce import apply_method

CLASS_TOKEN = False  # the authors' segmentation backbones have no class token (one test keeps it)
TINY = dict(depth=4, embed_dim=32, patch_size=8, stride=8, drop_path_rate=0.0)


def tiny_segmenter(num_classes: int = 5, class_token: bool = CLASS_TOKEN):
    torch.manual_seed(0)
    model = create_segmentation_model("vim_tiny_patch16_224", num_classes=num_classes, img_size=32,
                                      out_indices=(0, 1, 2, 3), channels=16, class_token=class_token, **TINY)
    return model.eval()


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("class_token", [False, True])
def test_dense_output_shape(class_token: bool) -> None:
    model = tiny_segmenter(7, class_token)
    assert model.backbone.num_protected == int(class_token)
    with torch.no_grad():
        assert model(images()).shape == (2, 7, 32, 32)
        assert model(images(1, 48)).shape == (1, 7, 48, 48)  # another size: pos_embed resampled


def test_class_token_left_out_of_the_maps() -> None:
    """With Vim's middle class token kept, the maps are the patch tokens' features in raster order."""
    model = tiny_segmenter(class_token=True)
    with torch.no_grad():
        maps, state = model.forward_backbone(images())
        reference = DenseRestore(None, model.out_indices, model.backbone.depth)
        taps = model.backbone.forward_tokens(images(), reference).extras[DENSE_TAPS]
    c = taps[0].shape[1] // 2  # the class token's dense position
    patches = torch.cat([taps[-1][:, :c], taps[-1][:, c + 1:]], 1)
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), patches, rtol=0, atol=0)


NO_REDUCTION = [
    ("dyvm", dict(keep=1.0, block_ratio=None, layers=[1, 2])),
    ("top", dict(keep=1.0, layers=[1, 2])),
    ("prune_norm", dict(keep=1.0, layers=[1, 2])),
    ("rmeeto", dict(r=0, layers=[1, 2])),
]


@pytest.mark.parametrize("name,opts", NO_REDUCTION, ids=[n for n, _ in NO_REDUCTION])
def test_identity_at_no_reduction(name: str, opts: dict) -> None:
    model = tiny_segmenter()
    x = images()
    with torch.no_grad():
        dense = model(x)
        apply_method(model.backbone, name, **opts)
        model.eval()
        reduced = model(x)
    torch.testing.assert_close(reduced, dense, rtol=0, atol=1e-6)


class Recorder(Reducer):
    """Reference bookkeeping: the state every hook sees, around the real method."""

    def __init__(self, inner: Reducer) -> None:
        super().__init__()
        self.inner, self.before, self.after = inner, {}, {}

    def begin(self, state: TokenState) -> TokenState:
        return self.inner.begin(state)

    def before_layer(self, i: int, state: TokenState) -> TokenState:
        self.before[i] = state
        new = self.inner.before_layer(i, state)
        self.after[i] = new
        return new

    def mixer_context(self, i: int, state: TokenState):
        return self.inner.mixer_context(i, state)

    def finish(self, state: TokenState) -> TokenState:
        self.before["end"] = state
        return state


def feature_at(state: TokenState, position: int, b: int) -> torch.Tensor:
    slot = int((state.positions[b] == position).nonzero()[0, 0])
    return state.hidden[b, slot].float() + state.residual[b, slot]


def run_recorded(model, x):
    """Final taps from DenseRestore, with the wrapped method's states recorded."""
    recorder = Recorder(model.backbone.reducer)
    wrapper = DenseRestore(recorder, model.out_indices, model.backbone.depth)
    state = model.backbone.forward_tokens(x, wrapper)
    return state.extras[DENSE_TAPS], recorder


@pytest.mark.parametrize("name,opts", [("top", dict(keep=0.5, layers=[2])),
                                       ("prune_norm", dict(keep=0.5, layers=[1, 3])),
                                       ("dyvm", dict(keep=0.6, block_ratio=None, layers=[2]))])
def test_pruned_token_keeps_feature_of_its_pruning_layer(name: str, opts: dict) -> None:
    model = tiny_segmenter()
    apply_method(model.backbone, name, **opts)
    model.eval()
    x = images()
    with torch.no_grad():
        taps, rec = run_recorded(model, x)
    end = rec.before["end"]
    layers = sorted(opts["layers"])
    dense_len = taps[-1].shape[1]
    checked = 0
    for b in range(x.shape[0]):
        for p in range(dense_len):
            if bool((end.positions[b] == p).any()):
                expected = feature_at(end, p, b)  # survivor: its final feature
            else:  # pruned before the first layer where it is missing: its feature entering that layer
                layer = next(i for i in layers if not bool((rec.after[i].positions[b] == p).any()))
                expected = feature_at(rec.before[layer], p, b)
                checked += 1
            torch.testing.assert_close(taps[-1][b, p], expected, rtol=0, atol=1e-6)
    assert checked > 0


def test_dyvm_training_masked_tokens_frozen() -> None:
    """Training-time DyVM keeps pruned tokens in the sequence under a mask: they are restored to their feature
    entering the pruning layer."""
    model = tiny_segmenter()
    apply_method(model.backbone, "dyvm", keep=0.5, block_ratio=None, layers=[2])
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        taps, rec = run_recorded(model, images())
    after = rec.after[2]
    masked = (after.mask < 0.5).nonzero().tolist()
    assert masked
    for b, slot in masked:
        p = int(after.positions[b, slot])
        torch.testing.assert_close(taps[-1][b, p], feature_at(rec.before[2], p, b), rtol=0, atol=1e-6)


def test_rmeeto_unmerge_follows_merge_chain() -> None:
    """r = 1 per event: the one vanished position joins the one token whose size grew; chained over events,
    every position ends with the final feature of the token that absorbed it."""
    model = tiny_segmenter()
    apply_method(model.backbone, "rmeeto", r=1, layers=[1, 2, 3])
    model.eval()
    x = images()
    with torch.no_grad():
        taps, rec = run_recorded(model, x)
    end = rec.before["end"]
    for b in range(x.shape[0]):
        owner = {}
        for i in (1, 2, 3):
            old, new = rec.before[i], rec.after[i]
            old_size = dict(zip(old.positions[b].tolist(), (old.sizes[b] if old.sizes is not None else
                                                          torch.ones(old.num_tokens)).tolist()))
            gone = set(old.positions[b].tolist()) - set(new.positions[b].tolist())
            grown = [p for p, s in zip(new.positions[b].tolist(), new.sizes[b].tolist()) if s > old_size[p]]
            assert len(gone) == 1 and len(grown) == 1
            owner[gone.pop()] = grown[0]
        for p in range(taps[-1].shape[1]):
            q = p
            while q in owner:
                q = owner[q]
            torch.testing.assert_close(taps[-1][b, p], feature_at(end, q, b), rtol=0, atol=1e-6)


def test_rmeeto_unmerge_destinations_are_the_merge_groups() -> None:
    """r = 3 in one event: each vanished position is restored to one grown token's feature, and the groups so
    formed are exactly R-MeeTo's merges: the grown token's residual times its size is the size-weighted sum of
    its group's residuals before the merge."""
    model = tiny_segmenter()
    apply_method(model.backbone, "rmeeto", r=3, layers=[1])
    model.eval()
    x = images()
    with torch.no_grad():
        taps, rec = run_recorded(model, x)
    old, new = rec.before[1], rec.after[1]
    for b in range(x.shape[0]):
        survivors = new.positions[b].tolist()
        gone = set(old.positions[b].tolist()) - set(survivors)
        groups = {q: [q] for q in survivors}
        for p in gone:  # the survivor whose feature p carries after block 1
            match = [q for q in survivors if torch.equal(taps[1][b, p], taps[1][b, q])]
            assert len(match) == 1
            groups[match[0]].append(p)
        for q, members in groups.items():
            slot_new = survivors.index(q)
            total = sum(float(old.sizes[b, s]) if old.sizes is not None else 1.0 for s in
                        [old.positions[b].tolist().index(m) for m in members])
            weighted = sum(old.residual[b, old.positions[b].tolist().index(m)] for m in members)
            assert float(new.sizes[b, slot_new]) == total
            torch.testing.assert_close(new.residual[b, slot_new] * total, weighted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,opts", [("dyvm", dict(keep=0.7, block_ratio=0.8, layers=[1, 2])),
                                       ("rmeeto", dict(r=3, layers=[1, 2, 3]))])
def test_reduced_model_trains(name: str, opts: dict) -> None:
    """Gradients reach the backbone through the restored maps, and the method's losses come with the state."""
    model = tiny_segmenter()
    apply_method(model.backbone, name, **opts)
    model.train()
    logits, state = model.forward_with_state(images())
    loss = logits.logsumexp(1).mean() + sum(model.backbone.reducer.extra_losses(state).values())
    loss.backward()
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_bad_out_indices() -> None:
    with pytest.raises(ValueError, match="out_indices must be 4 increasing block indices in 0..3"):
        create_segmentation_model("vim_tiny_patch16_224", img_size=32, out_indices=(0, 1, 2, 9),
                                  class_token=CLASS_TOKEN, **TINY)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name,opts", [("rmeeto", {"ratio": 0.31}), ("dyvm", {"keep": 0.8, "layers": [6, 12, 18]})])
def test_reduced_backbone_replays_its_eager_maps(name: str, opts: dict) -> None:
    """UperNet-Vim-S at 512x512, batch 16 (the speed benchmark's shape): the backbone forward captured as a CUDA
    graph and replayed gives the eager forward's feature maps bit for bit."""
    from mambatrim.engine.cuda_graph import capture_graph  # noqa: PLC0415

    torch.manual_seed(0)
    model = create_segmentation_model("vim_small_patch16_224", num_classes=150, img_size=512)
    apply_method(model.backbone, name, **opts)
    model = model.cuda().eval()
    images = torch.randn(16, 3, 512, 512, device="cuda")
    out: dict[str, list[torch.Tensor]] = {}

    def forward() -> None:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            out["maps"] = model.forward_backbone(images)[0]

    forward()
    eager = [m.clone() for m in out["maps"]]
    replay = capture_graph(forward)
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    for got, want in zip(out["maps"], eager):
        assert torch.equal(got, want)
