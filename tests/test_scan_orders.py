"""Scan orders as data: a toy backbone with PlainMamba's four zig-zag orders on the shared multi-path mixer.

Every path is checked against an independent reference written out here: the tokens permuted explicitly into
the order's visiting sequence (the order itself built by hand), a causal depthwise conv over that sequence
(over the dense sequence with pruned slots zeroed, when aligned), the projections, and the sequential ``ref``
scan with the order's gaps; then the outputs permuted back. Pruning is applied through the reducer contract.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mambatrim.contract import MixerContext, Reducer, TokenState, raster_orders, zigzag_orders
from mambatrim.models.mamba import MultiPathMixer, RMSNorm
from mambatrim.ops.scan_ref import selective_scan_ref

GRID = (3, 4)


def snake_rows(h: int, w: int) -> list[int]:
    return [r * w + (c if r % 2 == 0 else w - 1 - c) for r in range(h) for c in range(w)]


def snake_columns(h: int, w: int) -> list[int]:
    return [(r if c % 2 == 0 else h - 1 - r) * w + c for c in range(w) for r in range(h)]


def explicit_zigzags(h: int, w: int) -> list[list[int]]:
    """The four orders as visiting sequences of raster indices, built by hand."""
    rows, cols = snake_rows(h, w), snake_columns(h, w)
    return [rows, rows[::-1], cols, cols[::-1]]


@pytest.mark.parametrize("grid", [(3, 4), (4, 3), (5, 6), (14, 14)])
def test_zigzag_orders_equal_the_explicit_construction(grid: tuple[int, int]) -> None:
    for order, visits in zip(zigzag_orders(), explicit_zigzags(*grid)):
        rank = order.rank(grid)
        assert rank[torch.tensor(visits)].tolist() == list(range(grid[0] * grid[1])), order.name
    assert snake_rows(3, 4) == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
    assert snake_columns(3, 4) == [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3]


class DropAt(Reducer):
    """Keeps ``kept`` (B, K) raster positions (ascending) before block ``layer``; aligned scans after it."""

    def __init__(self, layer: int, kept: torch.Tensor, align: str | None) -> None:
        super().__init__()
        self.layer, self.kept, self.align = layer, kept, align

    def before_layer(self, layer_idx: int, state: TokenState) -> TokenState:
        return state.gather(self.kept) if layer_idx == self.layer else state

    def mixer_context(self, layer_idx: int, state: TokenState) -> MixerContext | None:
        if layer_idx < self.layer:
            return None
        return MixerContext(positions=state.positions, align=self.align)


class ToyGridBackbone(nn.Module):
    """Patch tokens on a grid, blocks of x + mixer(norm(x)) with four zig-zag scan paths, no class token."""

    def __init__(self, dim: int = 8, depth: int = 2, orders=None, combine: str = "sum") -> None:
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in range(depth))
        self.mixers = nn.ModuleList(MultiPathMixer(dim, orders or zigzag_orders(), combine, d_state=4, expand=2)
                                    for _ in range(depth))
        self.reducer: Reducer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x)
        bsz, length, _ = hidden.shape
        state = TokenState(hidden=hidden, residual=None, positions=torch.arange(length).expand(bsz, -1),
                           protected=torch.zeros(bsz, 1, dtype=torch.long), grid=GRID)
        for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers)):
            ctx = None
            if self.reducer is not None:
                state = self.reducer.before_layer(i, state)
                ctx = self.reducer.mixer_context(i, state)
            ctx = replace(ctx or MixerContext(), grid=state.grid)  # the backbone knows its grid
            state = state.replace(hidden=state.hidden + mixer(norm(state.hidden), ctx))
        return state.hidden


def reference_path(mixer: MultiPathMixer, k: int, hidden: torch.Tensor, positions: torch.Tensor,
                   visits: list[int], align: str | None) -> torch.Tensor:
    """Path k of ``mixer`` on tokens ``hidden`` (B, L, d) at raster ``positions`` (B, L), before out_proj,
    computed sample by sample on explicitly permuted inputs."""
    conv, x_proj, dt_proj, A_log, D = mixer.path_params(k)
    width, N, R = mixer.path_width, mixer.d_state, mixer.dt_rank
    step_of = {p: s for s, p in enumerate(visits)}  # raster index -> visiting step of the dense order
    xz = mixer.in_proj(hidden)
    x_all, z_all = xz[..., :mixer.d_inner], xz[..., mixer.d_inner:]
    if mixer.combine == "concat":
        x_all, z_all = x_all[..., k * width:(k + 1) * width], z_all[..., k * width:(k + 1) * width]
    outs = []
    for b in range(hidden.shape[0]):
        pos = positions[b].tolist()
        perm = sorted(range(len(pos)), key=lambda i: step_of[pos[i]])  # sequence indices in visiting order
        steps = [step_of[pos[i]] for i in perm]
        x, z = x_all[b, perm].T, z_all[b, perm].T  # (E, L) in visiting order
        if align is None:
            u = F.conv1d(x[None], conv.weight, conv.bias, padding=mixer.d_conv - 1, groups=width)[0, :, :len(perm)]
        else:  # the dense visiting sequence, pruned slots zero, conv, the kept steps picked
            dense = x.new_zeros(width, len(visits))
            dense[:, steps] = x
            full = F.conv1d(dense[None], conv.weight, conv.bias, padding=mixer.d_conv - 1, groups=width)[0]
            u = full[:, :len(visits)][:, steps]
        u = F.silu(u)
        x_dbl = u.T @ x_proj.weight.T
        dt, Bm, Cm = x_dbl[:, :R], x_dbl[:, R:R + N], x_dbl[:, R + N:]
        delta = (dt @ dt_proj.weight.T).T
        gap = None
        if align == "decay":
            gap = torch.tensor([0] + [steps[i] - steps[i - 1] - 1 for i in range(1, len(steps))]).float()[None]
        y = selective_scan_ref(u[None], delta[None], -torch.exp(A_log.float()), Bm.T[None], Cm.T[None],
                               D.float(), z[None], delta_bias=dt_proj.bias.float(), delta_softplus=True,
                               gap=gap)[0]  # (E, L) in visiting order
        back = torch.empty_like(y)
        back[:, perm] = y
        outs.append(back.T)
    return torch.stack(outs)


@pytest.mark.parametrize("align", [None, "hold", "decay"])
def test_each_zigzag_path_equals_ref_on_explicitly_permuted_pruned_tokens(align: str | None) -> None:
    torch.manual_seed(0)
    model = ToyGridBackbone()
    kept = torch.tensor([[0, 2, 3, 5, 6, 8, 11], [1, 2, 4, 7, 9, 10, 11]])  # 7 of 12 per image
    model.reducer = DropAt(1, kept, align)
    seen = {}
    model.mixers[1].register_forward_pre_hook(lambda m, args: seen.update(hidden=args[0], ctx=args[1]))
    images = torch.randn(2, 12, 3)
    with torch.no_grad():
        model(images)
        hidden, ctx, mixer = seen["hidden"], seen["ctx"], model.mixers[1]
        assert torch.equal(ctx.positions, kept)
        total = torch.zeros(2, 7, mixer.d_inner)
        for k, visits in enumerate(explicit_zigzags(*GRID)):
            only_k = torch.zeros(2, 4)
            only_k[:, k] = 1
            got = mixer(hidden, replace(ctx, direction_gate=only_k))  # out_proj of path k alone
            want = reference_path(mixer, k, hidden, kept, visits, align)
            torch.testing.assert_close(got, mixer.out_proj(want), rtol=1e-4, atol=1e-5)
            total += want
        torch.testing.assert_close(mixer(hidden, ctx), mixer.out_proj(total), rtol=1e-4, atol=1e-5)


def test_alignment_changes_the_zigzag_paths() -> None:
    """The aligned conv and decay gaps are honoured (a mixer ignoring them would pass the test above only for
    align=None)."""
    torch.manual_seed(0)
    model = ToyGridBackbone()
    kept = torch.tensor([[0, 2, 3, 5, 6, 8, 11]])
    outs = []
    with torch.no_grad():
        for align in (None, "hold", "decay"):
            model.reducer = DropAt(1, kept, align)
            outs.append(model(torch.ones(1, 12, 3)))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_per_group_channel_slices_with_raster_orders() -> None:
    """GroupMamba's layout: four raster directions, each on its own quarter of the channels, concatenated."""
    torch.manual_seed(0)
    model = ToyGridBackbone(orders=raster_orders(), combine="concat")
    mixer = model.mixers[0]
    hidden = torch.randn(2, 12, 8)
    h, w = GRID
    rows = list(range(h * w))
    cols = [r * w + c for c in range(w) for r in range(h)]
    with torch.no_grad():
        got = mixer(hidden, MixerContext(grid=GRID))
        positions = torch.arange(12).expand(2, -1)
        want = torch.cat([reference_path(mixer, k, hidden, positions, visits, None)
                          for k, visits in enumerate([rows, cols, rows[::-1], cols[::-1]])], -1)
    torch.testing.assert_close(got, mixer.out_proj(want), rtol=1e-4, atol=1e-5)


def test_grid_orders_need_the_grid_and_refuse_bad_settings() -> None:
    mixer = MultiPathMixer(8, zigzag_orders(), "sum", d_state=4)
    with pytest.raises(ValueError, match="must set MixerContext.grid"):
        mixer(torch.randn(1, 12, 8))
    with pytest.raises(ValueError, match="choose one of mean, sum, concat"):
        MultiPathMixer(8, zigzag_orders(), "average")
    with pytest.raises(ValueError, match="direction_gate must be"):
        mixer(torch.randn(1, 12, 8), MixerContext(grid=GRID, direction_gate=torch.ones(1, 2)))


def test_training_gradients_flow_through_every_grid_path() -> None:
    model = ToyGridBackbone()
    model.reducer = DropAt(1, torch.tensor([[0, 2, 3, 5, 6, 8, 11]]), "decay")
    model(torch.randn(1, 12, 3)).square().sum().backward()
    mixer = model.mixers[1]
    for k in range(4):
        conv, x_proj, dt_proj, A_log, D = mixer.path_params(k)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (conv.weight, x_proj.weight, A_log, D))
