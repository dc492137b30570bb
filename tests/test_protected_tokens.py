"""Protected tokens (class token, registers) through the token contract and every reduction method.

Three toy backbones: Vim with its middle class token (P = 1, layout 'middle'), Vim without a class token
(``if_cls_token=False``: P = 0), and a Vim subclass written here that inserts learned extra tokens at given
positions (P = 3 'spread' like MambaReg's registers, P = 1 'first' like VideoMamba's class token).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mambatrim import load_checkpoint
from mambatrim.contract import (MixerContext, TokenState, gate_feature, insert_at, layout_slots, protected_mask,
                                scan_gaps, token_mse, unprotected_index)
from mambatrim.models.mamba import BiMambaMixer
from mambatrim.models.vim import VisionMamba
from mambatrim.reduce import dyvm, rmeeto
from mambatrim.reduce.registry import METHODS, apply_method, sequence_methods

PATCHES = 16  # 32x32 images, 8x8 patches
SMALL = dict(img_size=32, patch_size=8, stride=8, depth=4, embed_dim=16, num_classes=5, drop_path_rate=0.0)


class ExtraTokenVim(VisionMamba):
    """Vim without its class token plus learned tokens inserted at ``slots`` of the embedded sequence (before
    any reduction), declared protected with ``layout``; the head reads the first of them."""

    def __init__(self, slots: tuple[int, ...], layout: str, **kwargs) -> None:
        super().__init__(if_cls_token=False, **kwargs)
        self.slots, self.layout = tuple(slots), layout
        self.extra = nn.Parameter(torch.randn(1, len(slots), self.embed_dim))

    @property
    def num_protected(self) -> int:
        return len(self.slots)

    def embed(self, x: torch.Tensor) -> TokenState:
        patches = super().embed(x).hidden
        bsz, m, _ = patches.shape
        pieces, start = [], 0
        for i, slot in enumerate(self.slots):
            pieces += [patches[:, start:slot - i], self.extra[:, i:i + 1].expand(bsz, -1, -1)]
            start = slot - i
        hidden = torch.cat(pieces + [patches[:, start:]], 1)
        total = m + len(self.slots)
        return TokenState(hidden=hidden, residual=None, positions=torch.arange(total).expand(bsz, -1),
                          protected=torch.tensor(self.slots).expand(bsz, -1), protected_layout=self.layout)


def spread_rule(num_keep: int, count: int) -> list[int]:
    """MambaReg's rule as its authors write it: interval = num_keep // (P + 1); training puts register i at
    (interval + 1) * (i + 1) - 1."""
    interval = num_keep // (count + 1)
    return [(interval + 1) * (i + 1) - 1 for i in range(count)]


BACKBONES = {
    "middle_cls": lambda: VisionMamba(**SMALL),
    "no_cls": lambda: VisionMamba(if_cls_token=False, **SMALL),
    "spread3": lambda: ExtraTokenVim(tuple(spread_rule(PATCHES, 3)), "spread", **SMALL),  # 4, 9, 14
    "first": lambda: ExtraTokenVim((0,), "first", **SMALL),
}
ORIGINAL = {"middle_cls": [PATCHES // 2], "no_cls": [], "spread3": spread_rule(PATCHES, 3), "first": [0]}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BACKBONES[name]().eval()


def images(bsz: int = 3) -> torch.Tensor:
    return torch.randn(bsz, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def watch_layers(model: nn.Module, expected: list[int]) -> list[TokenState]:
    """Record the state entering every block (after the reducer's before_layer), checking on the way that the
    protected tokens are still there, in order, at their original positions."""
    seen: list[TokenState] = []
    reducer = model.reducer
    inner = reducer.before_layer

    def before_layer(i: int, state: TokenState) -> TokenState:
        state = inner(i, state)
        assert state.protected.shape == (state.hidden.shape[0], len(expected))
        assert (state.protected.diff(dim=1) > 0).all()
        assert state.positions.gather(1, state.protected).tolist() == [expected] * state.hidden.shape[0]
        seen.append(state)
        return state

    reducer.before_layer = before_layer
    return seen


# ---------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", sequence_methods())
@pytest.mark.parametrize("keep", [0.6, 0.8])
def test_protected_tokens_survive_every_layer_in_order(backbone: str, method: str, keep: float) -> None:
    model = apply_method(build(backbone), method, keep=keep, layers=[1, 2]).eval()
    seen = watch_layers(model, ORIGINAL[backbone])
    x = images()
    with torch.no_grad():
        final = model.forward_tokens(x)
        logits = model(x)
    assert final.positions.gather(1, final.protected).tolist() == [ORIGINAL[backbone]] * 3
    assert final.num_tokens < seen[0].num_tokens  # the method did reduce
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    hidden_rows = final.hidden[torch.arange(3)[:, None], final.protected]
    assert torch.isfinite(hidden_rows).all()


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", sequence_methods())
def test_training_forward_keeps_protected_tokens(backbone: str, method: str) -> None:
    if not METHODS[method].trainable:
        pytest.skip(f"{method} is not trainable")
    model = apply_method(build(backbone), method, keep=0.6, layers=[1, 2]).train()
    watch_layers(model, ORIGINAL[backbone])
    state = model.forward_tokens(images())
    if state.mask is not None:  # training-time masking: protected tokens never masked out
        assert (state.mask.gather(1, state.protected) == 1).all()
    model.forward_head(model.pool(state)).sum().backward()


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", sequence_methods())
def test_identity_setting_equals_dense_model(backbone: str, method: str) -> None:
    model = build(backbone)
    x = images()
    with torch.no_grad():
        dense = model(x)
        apply_method(model, method, keep=1.0, layers=[1, 2]).eval()
        reduced = model(x)
    torch.testing.assert_close(reduced, dense, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("count", [1, 2, 3, 12])
def test_spread_layout_follows_the_register_rule(count: int) -> None:
    num_keep = torch.arange(0, 80)
    slots = layout_slots("spread", num_keep, count)
    for n in range(80):
        interval = n // (count + 1)
        assert slots[n].tolist() == spread_rule(n, count)
        # the inference form of the same rule: arange(interval, ..., step interval + 1), first P of them
        assert slots[n].tolist() == list(range(interval, n + count + interval + 1, interval + 1))[:count]


def test_first_and_middle_layouts() -> None:
    num_keep = torch.tensor([0, 5, 8])
    assert layout_slots("first", num_keep, 2).tolist() == [[0, 1]] * 3
    assert layout_slots("middle", num_keep, 1).tolist() == [[0], [2], [4]]
    assert layout_slots("none", num_keep, 0).shape == (3, 0)
    with pytest.raises(ValueError, match="choose one of middle, first, spread, none"):
        layout_slots("centre", num_keep, 1)
    with pytest.raises(ValueError, match="'none' declares no protected tokens"):
        layout_slots("none", num_keep, 2)


def test_dyvm_spread_places_registers_by_the_rule_in_training_and_inference() -> None:
    model = dyvm.apply(build("spread3"), keep=0.6, block_ratio=None, layers=[1, 2])
    seen = watch_layers(model, ORIGINAL["spread3"])
    model.train()
    model.forward_tokens(images())
    for state in seen[1:]:  # after each pruning stage: [kept with registers spread, pruned tail]
        kept = state.mask.sum(1).long() - 3
        for b in range(3):
            assert state.protected[b].tolist() == spread_rule(int(kept[b]), 3)
    seen.clear()
    model.eval()
    with torch.no_grad():
        model.forward_tokens(images())
    for state in seen[1:]:
        assert state.protected[0].tolist() == spread_rule(state.num_tokens - 3, 3)


def test_dyvm_first_layout_is_cls_kept_pruned() -> None:
    model = dyvm.apply(build("first"), keep=0.5, block_ratio=None, layers=[1])
    seen = watch_layers(model, [0])
    model.train()
    model.forward_tokens(images())
    state = seen[1]
    for b in range(3):
        kept = int(state.mask[b].sum()) - 1
        assert state.protected[b].tolist() == [0]
        assert state.mask[b, :kept + 1].eq(1).all() and state.mask[b, kept + 1:].eq(0).all()
        assert (state.positions[b, 1:kept + 1].diff() > 0).all()  # kept tokens in their original order
        assert (state.positions[b, kept + 1:].diff() > 0).all()  # pruned tail in order too


def test_insert_at_and_unprotected_index() -> None:
    protected = torch.tensor([[0, 3, 4], [2, 5, 9]])
    others = unprotected_index(protected, 10)
    assert others.tolist() == [[1, 2, 5, 6, 7, 8, 9], [0, 1, 3, 4, 6, 7, 8]]
    back = insert_at(others, protected, protected)
    assert back.tolist() == [list(range(10))] * 2
    assert protected_mask(protected, 10).sum(1).tolist() == [3, 3]
    empty = torch.zeros(2, 0, dtype=torch.long)
    assert unprotected_index(empty, 4).tolist() == [[0, 1, 2, 3]] * 2
    assert insert_at(torch.tensor([[7, 8]]), torch.zeros(1, 0, dtype=torch.long),
                     torch.zeros(1, 0, dtype=torch.long)).tolist() == [[7, 8]]


def test_gather_keeps_protected_indices() -> None:
    state = TokenState(hidden=torch.randn(2, 8, 4), residual=None, positions=torch.arange(8).expand(2, -1),
                       protected=torch.tensor([[1, 5], [0, 7]]), protected_layout="spread")
    index = torch.tensor([[0, 1, 3, 5], [0, 2, 6, 7]])
    out = state.gather(index)
    assert out.protected.tolist() == [[1, 3], [0, 3]]
    assert out.positions.gather(1, out.protected).tolist() == [[1, 5], [0, 7]]


# ---------------------------------------------------------------------------------------------- gate feature
@pytest.mark.parametrize("protected", [[[]] * 2, [[3], [0]], [[1, 4, 6], [0, 2, 7]]])
def test_gate_feature_through_the_mixer(protected: list[list[int]]) -> None:
    torch.manual_seed(0)
    mixer = BiMambaMixer(16).eval()
    hidden = torch.randn(2, 8, 16)
    protected_t = torch.tensor(protected, dtype=torch.long).reshape(2, -1)
    seen: list[torch.Tensor] = []

    def gate(feature: torch.Tensor) -> torch.Tensor:
        seen.append(feature)
        return torch.ones(feature.shape[0], 2)

    with torch.no_grad():
        mixer(hidden, MixerContext(protected=protected_t, direction_gate=gate))
        xz = mixer.in_proj(hidden)
    count = protected_t.shape[1]
    if count == 0:
        want = xz.mean(1)
    else:
        want = torch.stack([xz[b, protected_t[b]].mean(0) for b in range(2)])
    torch.testing.assert_close(seen[0].float(), want)


def test_gate_feature_with_mask_and_no_protected_token() -> None:
    xz = torch.randn(2, 5, 3)
    mask = torch.tensor([[1.0, 1, 0, 1, 0], [1, 1, 1, 1, 1]])
    got = gate_feature(xz, torch.zeros(2, 0, dtype=torch.long), mask)
    torch.testing.assert_close(got[0], xz[0, [0, 1, 3]].mean(0))
    torch.testing.assert_close(got[1], xz[1].mean(0))


def test_a_gate_needs_the_protected_tokens() -> None:
    mixer = BiMambaMixer(16)
    with pytest.raises(ValueError, match="MixerContext.protected"):
        mixer(torch.randn(1, 4, 16), MixerContext(direction_gate=lambda f: torch.ones(1, 2)))


# ---------------------------------------------------------------------------------------------- losses, merge
def test_token_mse_excludes_every_protected_token() -> None:
    teacher = torch.randn(2, 6, 3)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5]] * 2)
    student = teacher.clone()
    student[:, 1] += 5.0  # protected
    student[:, 4] += 5.0  # protected
    state = TokenState(student, None, positions, torch.tensor([[1, 4]] * 2), protected_layout="spread")
    t_state = TokenState(teacher, None, positions, torch.tensor([[1, 4]] * 2), protected_layout="spread")
    assert token_mse(state, t_state) == 0
    state.hidden[0, 0] += 1.0  # (1 per dim) over 2 x 4 unprotected tokens
    assert token_mse(state, t_state).item() == pytest.approx(1 / 8)


@pytest.mark.parametrize("rule", rmeeto.CLS_POSITIONS)
def test_merge_never_touches_protected_tokens(rule: str) -> None:
    g = torch.Generator().manual_seed(0)
    length = 21
    protected = torch.tensor([[0, 1, 10], [3, 12, 20]])
    state = TokenState(hidden=torch.randn(2, length, 6, generator=g, dtype=torch.float64),
                       residual=torch.randn(2, length, 6, generator=g, dtype=torch.float64),
                       positions=torch.arange(length).expand(2, -1), protected=protected, protected_layout="spread")
    rows = torch.arange(2)[:, None]
    for _ in range(3):
        out = rmeeto.merge_tokens(state, 3, rule)
        assert out.num_tokens == state.num_tokens - 3 and (out.protected.diff(dim=1) > 0).all()
        for field in ("hidden", "residual", "positions"):
            assert torch.equal(getattr(out, field)[rows, out.protected], getattr(state, field)[rows, state.protected])
        assert (out.sizes[rows, out.protected] == 1).all()
        free = ~protected_mask(out.protected, out.num_tokens)
        assert (out.positions[free].view(2, -1).diff(dim=1) > 0).all()  # others stay in order
        state = out


def test_scan_gaps_with_several_protected_tokens() -> None:
    # registers (original 3 and 9) re-spread between kept patches: out of order ones are transparent
    positions = torch.tensor([[0, 5, 3, 7, 9, 12]])
    protected = torch.tensor([[2, 4]])  # 3 (out of order between 5 and 7), 9 (in order between 7 and 12)
    assert scan_gaps(positions, False, protected)[0].tolist() == [0, 4, 0, 1, 1, 2]
    assert scan_gaps(positions, True, protected)[0].tolist() == [4, 1, 0, 1, 2, 0]


# ---------------------------------------------------------------------------------------------- Vim, no cls
def test_vim_without_class_token_pools_the_mean() -> None:
    model = build("no_cls")
    assert model.cls_token is None and model.pos_embed.shape == (1, PATCHES, 16) and model.num_protected == 0
    x = images()
    with torch.no_grad():
        state = model.forward_tokens(x)
        assert state.protected.shape == (3, 0) and state.protected_layout == "none"
        torch.testing.assert_close(model(x), model.head(state.hidden.mean(1)))


def test_vim_without_class_token_loads_a_checkpoint_for_another_grid() -> None:
    source = VisionMamba(**{**SMALL, "img_size": 48}, if_cls_token=False)
    target = VisionMamba(if_cls_token=False, **SMALL)
    report = load_checkpoint(target, source.state_dict())
    assert target.pos_embed.shape == (1, PATCHES, 16) and report.resized
    grid = source.pos_embed.detach().reshape(1, 6, 6, 16).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(target.pos_embed.detach(), want.permute(0, 2, 3, 1).reshape(1, PATCHES, 16))


def test_schedules_count_the_protected_tokens() -> None:
    model = build("spread3")  # 16 patches + 3 registers
    with pytest.raises(ValueError, match=r"0\.\.8"):
        rmeeto.apply(model, r=9, layers=[1])
    assert rmeeto.apply(model, r=8, layers=[1]).reducer.r == 8
    assert dyvm.apply(model, keep=0.5, layers=[1]).reducer.protected == 3
    from mambatrim.reduce.pruning import tokens_per_layer

    counts = tokens_per_layer(19, 4, [1], 0.5, protected=3)
    assert counts == [19, 11, 11, 11]  # 8 of 16 patches kept, + 3 registers
    apply_method(model, "prune_norm", keep=0.5, layers=[1])
    with torch.no_grad():
        assert model.forward_tokens(images()).num_tokens == counts[-1]


@pytest.mark.parametrize("backbone", ["no_cls", "spread3"])
def test_per_image_selector_calibration_reads_the_gate_feature(backbone: str) -> None:
    from mambatrim.engine.dyvm_selectors import set_per_image_block_policy

    model = dyvm.deploy(dyvm.apply(build(backbone), keep=None, block_ratio=0.5))
    x = images(8)
    set_per_image_block_policy(model, x, 0.5, rounds=2)
    with torch.no_grad():
        model(x)
    # calibrated on the mixer's own gate feature: about half of the images run each direction of later layers
    for layer in model.layers[1:]:
        share = layer.mixer.last_stats["gate"].float().mean(0)
        assert ((share >= 0.25) & (share <= 0.75)).all(), share
