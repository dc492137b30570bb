"""What a reduction method did to each image, as PNG grids like the papers' figures.

:func:`trace` runs a model with its method attached and records, through the method's own hooks and state (never
a re-implementation of it), per block: which original tokens are still there (``TokenState.positions``), which
original tokens each remaining token stands for (merging), the importance a pruner scored (its ``scores``
hook), and which scan directions each mixer ran (the mixers' ``last_stats``). The plots then draw:

* :func:`plot_tokens` - the kept tokens per stage (DyVM Fig. 5) and merged groups coloured by their destination
  token (R-MeeTo Fig. 5);
* :func:`plot_scores` - a pruner's importance scores with the pruned positions crossed out (ToP);
* :func:`plot_directions` - per image, which scan directions ran in each block (DyVM's block selection).

Merge groups are read by carrying an identity matrix (one column per original token) in extra columns of the
residual stream through the blocks that merge: a merge averages residual rows exactly as it averages the
hidden state, so afterwards each row's non-zero columns are its group. The trace runs twice (the method is
deterministic at inference): once plainly, to find the blocks that merge, and once carrying the identity there.
A video model's grid (frames, rows, columns) is drawn with the frames in a row.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..contract import Reducer, TokenState


@dataclass
class Trace:
    """What the method did to a batch. ``positions[i]`` (B, L_i): the dense-sequence index of each token entering
    block ``i``; ``groups[i]`` (B, L_i, N) where block ``i`` merged (weights of the N dense tokens each token
    stands for); ``scores[i]`` (B, L_{i-1}): a pruner's importance of the tokens it scored before block ``i``;
    ``directions`` (B, depth, 2): 1 where a scan direction ran (None: every one ran)."""

    grid: tuple[int, ...]
    protected: tuple[int, ...]  # dense-sequence indices of the protected tokens (class token, registers)
    positions: list[Tensor] = field(default_factory=list)
    groups: dict[int, Tensor] = field(default_factory=dict)
    scores: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # block -> (positions, scores)
    directions: Tensor | None = None
    merged: set[int] = field(default_factory=set)  # blocks before which tokens were merged (total size kept)

    @property
    def num_patches(self) -> int:
        return int(torch.tensor(self.grid).prod())

    def patch_index(self, positions: Tensor) -> Tensor:
        """Dense-sequence indices -> patch indices (protected tokens become -1)."""
        protected = torch.tensor(self.protected, dtype=positions.dtype)
        shifted = positions - (positions[..., None] > protected).sum(-1)
        return torch.where((positions[..., None] == protected).any(-1), torch.full_like(positions, -1), shifted)

    def stages(self) -> list[int]:
        """The blocks before which the token set changed."""
        dense = torch.arange(self.num_patches + len(self.protected)).expand(self.positions[0].shape[0], -1)
        previous = [dense] + self.positions[:-1]
        return [i for i, (now, before) in enumerate(zip(self.positions, previous))
                if now.shape != before.shape or not torch.equal(now, before)]


class _Recorder(Reducer):
    """Delegates every hook to ``inner`` and records the state it hands back (see the module docstring)."""

    def __init__(self, inner: Reducer, trace: Trace, carry_groups: set[int]) -> None:
        super().__init__()
        self.inner, self.trace, self.carry_groups = inner, trace, carry_groups
        self.members: Tensor | None = None

    def begin(self, state: TokenState) -> TokenState:
        state = self.inner.begin(state)
        eye = torch.eye(state.num_tokens, device=state.hidden.device)
        self.members = eye.expand(state.hidden.shape[0], -1, -1)
        return state

    def before_layer(self, layer_idx: int, state: TokenState) -> TokenState:
        width = state.hidden.shape[-1]
        carry = layer_idx in self.carry_groups and state.residual is not None
        if carry:
            members = self.members.to(state.residual.dtype)
            state = state.replace(residual=torch.cat([state.residual, members], -1))
        out = self.inner.before_layer(layer_idx, state)
        if carry:
            self.members, residual = out.residual[..., width:].float(), out.residual[..., :width]
            out = out.replace(residual=residual)
        else:  # pruning or nothing: each remaining token keeps its own row
            self.members = _rows_by_position(self.members, state.positions, out.positions)
        if self.carry_groups and layer_idx >= min(self.carry_groups):  # groups as they stand after this block
            self.trace.groups[layer_idx] = (self.members / self.members.sum(-1, keepdim=True).clamp_min(1e-12)).cpu()
        if out.num_tokens < state.num_tokens and out.sizes is not None and torch.allclose(
                out.sizes.sum(1), state.sizes.sum(1) if state.sizes is not None else out.sizes.new_full(
                    out.sizes.shape[:1], float(state.num_tokens))):
            self.trace.merged.add(layer_idx)
        self.trace.positions.append(out.positions.detach().cpu())
        return out

    def mixer_context(self, layer_idx: int, state: TokenState) -> Any:
        return self.inner.mixer_context(layer_idx, state)

    def finish(self, state: TokenState) -> TokenState:
        return self.inner.finish(state)


def _rows_by_position(rows: Tensor, before: Tensor, after: Tensor) -> Tensor:
    """The rows of ``rows`` (B, L, N) of the tokens that are still there, in their new order."""
    if before.shape == after.shape and torch.equal(before, after):
        return rows
    index = (after[:, :, None] == before[:, None, :]).float().argmax(-1)  # (B, L') slot of each survivor before
    return rows.gather(1, index[..., None].expand(-1, -1, rows.shape[-1]))


@contextlib.contextmanager
def _recording_scores(reducer: nn.Module, trace: Trace) -> Iterator[None]:
    """While active, every pruner's ``scores(layer, state)`` hook (ToP, the baselines) also lands in the trace."""
    patched = []
    for module in reducer.modules():
        original = getattr(module, "scores", None)
        if isinstance(module, Reducer) and callable(original) and not isinstance(original, Tensor):
            def recording(layer_idx: int, state: TokenState, _original: Any = original) -> Tensor:
                score = _original(layer_idx, state)
                trace.scores[layer_idx] = (state.positions.detach().cpu(), score.detach().float().cpu())
                return score
            module.scores = recording  # instance attribute: shadows the method until restored
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.scores


@torch.no_grad()
def trace(model: nn.Module, images: Tensor) -> Trace:
    """Run ``model`` (with its reduction method attached, in eval mode) on ``images`` and record what the method
    did (see :class:`Trace`)."""
    inner = getattr(model, "reducer", None)
    if inner is None:
        raise ValueError("the model has no reduction method attached: apply one (e.g. apply_method(model, "
                         "'rmeeto', ratio=0.3)) before tracing it")
    was_training = model.training
    model.eval()
    state = model.embed(images)
    grid = state.grid or tuple(model.patch_embed.grid_for(images.shape[-2], images.shape[-1]))
    protected = tuple(int(p) for p in state.positions.gather(1, state.protected)[0])
    try:
        merged = _run(model, inner, images, Trace(grid, protected), set()).merged
        result = _run(model, inner, images, Trace(grid, protected), merged)
    finally:
        model.set_reducer(inner)
        model.train(was_training)
    gates = [getattr(layer.mixer, "last_stats", {}).get("gate") for layer in model.layers]
    if any(g is not None for g in gates):
        ones = torch.ones(images.shape[0], 2)
        result.directions = torch.stack([ones if g is None else (g.float().cpu() > 0.5).float() for g in gates], 1)
    return result


def _run(model: nn.Module, inner: Reducer, images: Tensor, out: Trace, carry: set[int]) -> Trace:
    recorder = _Recorder(inner, out, carry)
    model.set_reducer(recorder)
    with _recording_scores(inner, out):
        model(images)
    return out


# ------------------------------------------------------------------------------------------------ drawing
def _layout(grid: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the picture of a token grid: a video's frames side by side."""
    if len(grid) == 3:
        return grid[1], grid[0] * grid[2]
    return grid[0], grid[1]


def _to_picture(values: Tensor, grid: tuple[int, ...]) -> Tensor:
    """(..., N) per-patch values -> (..., rows, cols) as drawn (frames in a row for a video grid)."""
    if len(grid) == 3:
        t, h, w = grid
        return values.reshape(*values.shape[:-1], t, h, w).movedim(-3, -2).reshape(*values.shape[:-1], h, t * w)
    return values.reshape(*values.shape[:-1], *grid)


def _show_images(images: Tensor) -> Tensor:
    """(B, C, H, W) model inputs -> (B, H, W, 3) in [0, 1] for display (each image stretched to its range).
    A video clip (B, C, T, H, W) is shown with its frames in a row."""
    x = images.detach().float().cpu()
    if x.dim() == 5:
        x = x.permute(0, 1, 3, 2, 4).reshape(x.shape[0], x.shape[1], x.shape[3], -1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).permute(0, 2, 3, 1)
    return x.expand(-1, -1, -1, 3) if x.shape[-1] == 1 else x[..., :3]


def _upsample(values: Tensor, size: tuple[int, int]) -> Tensor:
    """(rows, cols[, 3]) per-patch values -> pixel resolution (nearest)."""
    v = values if values.dim() == 3 else values[..., None]
    v = torch.nn.functional.interpolate(v.permute(2, 0, 1)[None], size=size, mode="nearest")[0].permute(1, 2, 0)
    return v if values.dim() == 3 else v[..., 0]


def _token_picture(trace: Trace, image: Tensor, b: int, block: int) -> Tensor:
    """One image as the tokens entering ``block`` see it: removed patches dark, merge groups tinted by their
    destination token."""
    rows, cols = _layout(trace.grid)
    n = trace.num_patches
    alive = torch.zeros(n)
    patches = trace.patch_index(trace.positions[block][b])
    alive[patches[patches >= 0]] = 1.0
    tint = torch.zeros(n, 3)
    groups = [g for i, g in sorted(trace.groups.items()) if i <= block]
    if groups:
        weights = groups[-1][b].float()  # (L, N_dense): the dense tokens each token stands for
        weights = weights[:, trace.patch_index(torch.arange(weights.shape[1])) >= 0]  # patch columns only
        owner, size = weights.argmax(0), (weights > 0).sum(1)
        colours = torch.rand(weights.shape[0], 3, generator=torch.Generator().manual_seed(b))
        merged = size[owner] > 1
        tint[merged] = colours[owner[merged]]
        alive = torch.where(merged, torch.ones_like(alive), alive)
    size = tuple(image.shape[:2])
    alive_px = _upsample(_to_picture(alive, trace.grid), size)[..., None]
    tint_px = _upsample(_to_picture(tint.T, trace.grid).permute(1, 2, 0), size)
    tinted = torch.where(tint_px.sum(-1, keepdim=True) > 0, 0.45 * image + 0.55 * tint_px, image)
    return tinted * (0.15 + 0.85 * alive_px)


def _figure(rows: int, cols: int, scale: float = 1.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(scale * cols + 0.4, scale * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def save_figure(fig: Any, path: str | Path, title: str, fontsize: int = 9, dpi: int = 100) -> Path:
    """Title, tight layout, write ``path`` (its folder made), close the figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_tokens(trace: Trace, images: Tensor, path: str | Path, title: str = "") -> Path:
    """Each image (row) as the blocks after each reduction stage see it (columns): removed tokens dark, merged
    groups tinted with one colour per destination token."""
    pics = _show_images(images)
    stages = trace.stages()
    fig, axes = _figure(len(pics), len(stages) + 1)
    for b, image in enumerate(pics):
        axes[b, 0].imshow(image.numpy())
        for j, block in enumerate(stages, 1):
            axes[b, j].imshow(_token_picture(trace, image, b, block).clamp(0, 1).numpy())
            if b == 0:
                axes[b, j].set_title(f"block {block}: {trace.positions[block].shape[1] - 1} tokens", fontsize=7)
    axes[0, 0].set_title(f"input: {trace.num_patches} tokens", fontsize=7)
    return save_figure(fig, path, title or "tokens per stage (dark: removed; colour: merged into one token)")


def plot_scores(trace: Trace, images: Tensor, path: str | Path, title: str = "") -> Path:
    """Per pruning point (columns): the importance each token was scored (heat map) and the tokens pruned there
    (crossed out)."""
    if not trace.scores:
        raise ValueError("the method recorded no importance scores (only pruners scored by a 'scores' hook "
                         "have them, e.g. top, prune_norm)")
    pics = _show_images(images)
    points = sorted(trace.scores)
    rows, cols = _layout(trace.grid)
    fig, axes = _figure(len(pics), len(points) + 1)
    for b, image in enumerate(pics):
        axes[b, 0].imshow(image.numpy())
        for j, block in enumerate(points, 1):
            positions, score = trace.scores[block]
            heat = torch.full((trace.num_patches,), float("nan"))
            patches = trace.patch_index(positions[b])
            heat[patches[patches >= 0]] = score[b][patches >= 0]
            axes[b, j].imshow(_to_picture(heat, trace.grid).numpy(), cmap="viridis")
            kept = set(trace.patch_index(trace.positions[block][b]).tolist())
            pruned = [int(p) for p in patches.tolist() if p >= 0 and p not in kept]
            ys, xs = zip(*[divmod(p, cols) for p in pruned]) if pruned else ((), ())
            axes[b, j].scatter(xs, ys, marker="x", s=18, color="red", linewidths=1)
            if b == 0:
                axes[b, j].set_title(f"before block {block}: {len(pruned)} pruned", fontsize=7)
    return save_figure(fig, path, title or "importance scores (bright: kept first) and pruned tokens (x)")


def plot_directions(trace: Trace, images: Tensor, path: str | Path, title: str = "") -> Path:
    """Per image: which scan directions (forward, backward) ran in each block (DyVM's block selection)."""
    if trace.directions is None:
        raise ValueError("the method selected no scan directions (only DyVM with block_ratio does)")
    pics = _show_images(images)
    fig, axes = _figure(len(pics), 2, scale=1.8)
    for b, image in enumerate(pics):
        axes[b, 0].imshow(image.numpy())
        axes[b, 1].imshow(trace.directions[b].T.numpy(), cmap="Greens", vmin=0, vmax=1.3, aspect="auto")
        axes[b, 1].set_yticks([0, 1], ["fwd", "bwd"], fontsize=6)
        ran = int(trace.directions[b].sum())
        axes[b, 1].set_title(f"{ran} of {trace.directions[b].numel()} scans ran", fontsize=7)
    axes[-1, 1].set_xlabel("block", fontsize=7)
    return save_figure(fig, path, title or "scan directions run per block (green: ran)")


def visualize(model: nn.Module, images: Tensor, out_dir: str | Path, stem: str = "method") -> list[Path]:
    """Trace ``model`` on ``images`` and write every plot that applies to its method: ``STEM_tokens.png``,
    ``STEM_scores.png`` (pruners with scores), ``STEM_directions.png`` (scan-direction selection)."""
    result = trace(model, images)
    out = Path(out_dir)
    paths = []
    if result.stages():
        paths.append(plot_tokens(result, images, out / f"{stem}_tokens.png", f"{stem}: tokens per stage "
                                 "(dark: removed; colour: merged into one token)"))
    if result.scores:
        paths.append(plot_scores(result, images, out / f"{stem}_scores.png",
                                 f"{stem}: importance scores and pruned tokens (x)"))
    if result.directions is not None:
        paths.append(plot_directions(result, images, out / f"{stem}_directions.png",
                                     f"{stem}: scan directions run per block (green: ran)"))
    return paths
