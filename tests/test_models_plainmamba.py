"""PlainMamba: official keys/shapes, scan orders and direction labels against an explicit construction of the
official ``get_permute_order``, logits against an independent re-implementation of the official forward on a
non-square grid, checkpoint loading (mmcls layout, resized pos_embed), the mixer after pruning per order."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from mambatrim.contract import MixerContext, zigzag_orders
from mambatrim.models import list_models, load_checkpoint
from mambatrim.models.plainmamba import PlainMamba2D
from mambatrim.ops.scan_ref import selective_scan_ref

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "plainmamba_official_state_dict.json").read_text())
RIGHT, LEFT, UP, DOWN = 1, 2, 3, 4
MOVES = {RIGHT: (0, 1), LEFT: (0, -1), UP: (-1, 0), DOWN: (1, 0)}


# ---------------------------------------------------------------------------------------------- scan orders
def snake(height: int, width: int, start: tuple[int, int], run: int, turn: int) -> tuple[list[int], list[int]]:
    """The official construction: from ``start`` walk along ``run`` (a move), at the grid's edge step once in
    ``turn`` and walk back; labels are the move into each token, 0 for the first (``[0] + d[:-1]``)."""
    back = {RIGHT: LEFT, LEFT: RIGHT, UP: DOWN, DOWN: UP}
    (i, j), order, moves = start, [], []
    while 0 <= i < height and 0 <= j < width:
        order.append(i * width + j)
        di, dj = MOVES[run]
        if 0 <= i + di < height and 0 <= j + dj < width:
            i, j = i + di, j + dj
            moves.append(run)
        else:
            di, dj = MOVES[turn]
            i, j = i + di, j + dj
            moves.append(turn)
            run = back[run]
    return order, [0] + moves[:-1]


def official_orders(height: int, width: int) -> list[tuple[list[int], list[int]]]:
    """o1..o4 with their labels as ``get_permute_order`` builds them (o2, o4 from their own start corners)."""
    return [
        snake(height, width, (0, 0), RIGHT, DOWN),
        snake(height, width, (height - 1, width - 1), LEFT, UP) if height % 2 else
        snake(height, width, (height - 1, 0), RIGHT, UP),
        snake(height, width, (0, 0), DOWN, RIGHT),
        snake(height, width, (height - 1, width - 1), UP, LEFT) if width % 2 else
        snake(height, width, (0, width - 1), DOWN, LEFT),
    ]


@pytest.mark.parametrize("grid", [(14, 14), (6, 5), (5, 6)])
def test_zigzag_orders_and_labels_match_the_official_construction(grid):
    from mambatrim.models.plainmamba import ROW_RUNS, direction_labels

    for order, row_runs, (expected, labels) in zip(zigzag_orders(), ROW_RUNS, official_orders(*grid)):
        index = order.dense_index(grid, torch.device("cpu"))
        assert index.tolist() == expected, order.name
        assert direction_labels(index[None], grid[1], row_runs)[0].tolist() == labels, order.name


# ---------------------------------------------------------------------------------------------- keys, configs
def meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", list_models("PlainMamba"))
def test_state_dict_matches_official_keys_and_shapes(name):
    expected = [(k, tuple(v)) for k, v in FIXTURE["configs"][name]]
    model = meta_model(name)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
    assert sum(p.numel() for p in model.parameters()) == FIXTURE["params"][name]


def test_parameter_counts_are_the_published_ones():
    counts = {"plainmamba_l1": 7_551_656, "plainmamba_l2": 26_145_832, "plainmamba_l3": 50_956_456}
    backbone = {"plainmamba_l1": 7.36, "plainmamba_l2": 25.76, "plainmamba_l3": 50.51}
    for name, count in counts.items():
        params = dict(meta_model(name).named_parameters())
        assert sum(p.numel() for p in params.values()) == count
        assert round(sum(p.numel() for k, p in params.items() if k.startswith("backbone.")) / 1e6, 2) == backbone[name]


def test_timm_overrides_build_a_non_square_model():
    model = timm.create_model("plainmamba_l1", depth=2, num_classes=10, img_size=(96, 80))
    assert len(model.layers) == 2 and model.patch_embed.grid_size == (6, 5)
    assert model.layers[0].with_dwconv and not model.layers[1].with_dwconv
    assert model(torch.randn(1, 3, 96, 80)).shape == (1, 10)
    with pytest.raises(TypeError, match="unknown arguments"):
        timm.create_model("plainmamba_l1", depth=2, embed_dims=8)


# ---------------------------------------------------------------------------------------------- reference forward
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fixed, non-trivial weights everywhere (BN statistics included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("A_log"):
                t.copy_(torch.log(torch.rand(t.shape, generator=gen) * 8 + 0.5))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    return model.eval()


def bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        False, 0.0, 1e-5)


def reference_logits(sd: dict, images: torch.Tensor, depth: int, num_convs: int, dw_layers: set[int],
                     pos_grid: tuple[int, int]) -> torch.Tensor:
    """The official forward from the issue's rules, on raw tensors (no module of the model is called);
    ``pos_grid``: the grid the pos_embed table was made for."""
    pe = "backbone.patch_embed"
    x = F.relu(bn(F.conv2d(images, sd[f"{pe}.stem.0.weight"], stride=2, padding=3), sd, f"{pe}.stem.1"))
    for i in range(num_convs):
        x = F.relu(bn(F.conv2d(x, sd[f"{pe}.convs.{3 * i}.weight"], padding=1), sd, f"{pe}.convs.{3 * i + 1}"))
    x = F.pad(x, (0, (8 - x.shape[3] % 8) % 8, 0, (8 - x.shape[2] % 8) % 8))
    x = F.conv2d(x, sd[f"{pe}.projection.weight"], sd[f"{pe}.projection.bias"], stride=8)
    bsz, dim, height, width = x.shape
    pos = sd["backbone.pos_embed"].reshape(1, *pos_grid, dim).permute(0, 3, 1, 2)
    if pos_grid != (height, width):
        pos = F.interpolate(pos, size=(height, width), mode="bicubic", align_corners=False)
    x = (x + pos).flatten(2).transpose(1, 2)
    orders = official_orders(height, width)
    for i in range(depth):
        p = f"backbone.layers.{i}"
        m = f"{p}.mamba"
        h = F.layer_norm(x, (dim,), sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], 1e-5)
        xs, z = (h @ sd[f"{m}.in_proj.weight"].T + sd[f"{m}.in_proj.bias"]).chunk(2, -1)
        inner = xs.shape[-1]
        xs = xs.transpose(1, 2).reshape(bsz, inner, height, width)
        xc = F.silu(F.conv2d(xs, sd[f"{m}.conv2d.weight"], sd[f"{m}.conv2d.bias"], padding=3, groups=inner))
        xc = xc.flatten(2).transpose(1, 2)  # (B, L, E) raster
        rank = sd[f"{m}.dt_proj.weight"].shape[1]
        dt, B, C = (xc @ sd[f"{m}.x_proj.weight"].T).split([rank, 16, 16], -1)
        dt = dt @ sd[f"{m}.dt_proj.weight"].T + sd[f"{m}.dt_proj.bias"]
        A = -torch.exp(sd[f"{m}.A_log"])
        total = 0
        for order, labels in orders:
            B_k = B.transpose(1, 2) + sd[f"{m}.direction_Bs"][labels].T[None]
            y = selective_scan_ref(xc[:, order].transpose(1, 2), dt.transpose(1, 2), A, B_k, C.transpose(1, 2),
                                   sd[f"{m}.D"], None, delta_bias=sd[f"{m}.dt_proj.bias"], delta_softplus=True)
            inverse = torch.argsort(torch.tensor(order))
            total = total + y.transpose(1, 2)[:, inverse]
        x = x + (total * F.silu(z)) @ sd[f"{m}.out_proj.weight"].T + sd[f"{m}.out_proj.bias"]
        if i in dw_layers:
            grid = x.transpose(1, 2).reshape(bsz, dim, height, width)
            grid = F.gelu(bn(F.conv2d(grid, sd[f"{p}.dw.0.weight"], padding=1, groups=dim), sd, f"{p}.dw.1"))
            x = grid.flatten(2).transpose(1, 2)
    x = F.layer_norm(x, (dim,), sd["backbone.ln1.weight"], sd["backbone.ln1.bias"], 1e-6).mean(1)
    return x @ sd["head.fc.weight"].T + sd["head.fc.bias"]


@pytest.mark.parametrize("name,num_convs,dw_layers", [("plainmamba_l1", 1, {0}), ("plainmamba_l2", 2, set())])
@pytest.mark.parametrize("size", [(96, 80), (112, 64)])
def test_logits_match_an_independent_reference_on_a_non_square_grid(name, num_convs, dw_layers, size):
    # built for 96x80 (6x5 tokens); 112x64 (7x4) exercises the bicubic pos_embed resampling at run time
    model = randomize(timm.create_model(name, depth=2, num_classes=10, img_size=(96, 80), embed_dim=24))
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    sd = {k: v.float() for k, v in model.state_dict().items()}
    with torch.no_grad():
        got = model(images)
        expected = reference_logits(sd, images, 2, num_convs, dw_layers, (6, 5))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_official_mmcls_checkpoint_loads_strictly_with_a_resized_pos_embed(tmp_path):
    source = randomize(timm.create_model("plainmamba_l1", depth=2, num_classes=10), seed=3)
    ema = {f"ema_{k.replace('.', '_')}": torch.zeros_like(v) for k, v in source.named_parameters()}  # EMA hook
    official = {"meta": {"epoch": 300}, "state_dict": {**source.state_dict(), **ema}}
    path = tmp_path / "plain_mamba_l1.pth"
    torch.save(official, path)
    target = timm.create_model("plainmamba_l1", depth=2, num_classes=10)
    assert load_checkpoint(target, path).skipped == [f"{len(ema)} ema_* buffers of the EMA checkpoint hook"]
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key

    small = timm.create_model("plainmamba_l1", depth=2, num_classes=10, img_size=(96, 80))
    report = load_checkpoint(small, path)
    assert report.resized == [f"backbone.pos_embed (1, 196, {small.embed_dim}) -> (1, 30, {small.embed_dim})"]
    pe = source.backbone.pos_embed.detach().reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(pe, size=(6, 5), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(small.backbone.pos_embed.detach(), expected)
    source.eval(), small.eval()
    images = torch.randn(1, 3, 96, 80)
    with torch.no_grad():  # the resampled table equals resampling at run time
        torch.testing.assert_close(small(images), source(images), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- pruned tokens
def reference_pruned_mixer(mixer: PlainMamba2D, hidden: torch.Tensor, positions: list[int], grid: tuple[int, int],
                           decay: bool) -> torch.Tensor:
    """The documented rules for surviving tokens, from the explicit official orders: each order visits the
    survivors in its order; a label is the move from the previous survivor (along the run inside one row /
    column, else the turn); the gap is the number of skipped dense steps; the 7x7 conv sees a zero-filled grid."""
    sd = {k: v.detach() for k, v in mixer.state_dict().items()}
    height, width = grid
    inner = mixer.d_inner
    xs, z = (hidden @ sd["in_proj.weight"].T + sd["in_proj.bias"]).chunk(2, -1)
    dense = torch.zeros(1, height * width, inner)
    dense[0, positions] = xs[0]
    conv = F.conv2d(dense.transpose(1, 2).reshape(1, inner, height, width), sd["conv2d.weight"], sd["conv2d.bias"],
                    padding=mixer.conv_size // 2, groups=inner)
    xc = F.silu(conv.flatten(2).transpose(1, 2)[:, positions])
    dt, B, C = (xc @ sd["x_proj.weight"].T).split([mixer.dt_rank, 16, 16], -1)
    dt = dt @ sd["dt_proj.weight"].T + sd["dt_proj.bias"]
    total = 0
    for k, (order, _) in enumerate(official_orders(height, width)):
        steps = [s for s, p in enumerate(order) if p in positions]  # dense steps of the survivors, ascending
        visited = [order[s] for s in steps]
        seq = [positions.index(p) for p in visited]
        labels, gaps = [0], [0.0]
        for a, b, sa, sb in zip(visited, visited[1:], steps, steps[1:]):
            (ra, ca), (rb, cb) = divmod(a, width), divmod(b, width)
            same_run = ra == rb if k < 2 else ca == cb
            if (k < 2) == same_run:
                labels.append(RIGHT if cb > ca else LEFT)
            else:
                labels.append(DOWN if rb > ra else UP)
            gaps.append(float(sb - sa - 1))
        B_k = B.transpose(1, 2) + sd["direction_Bs"][labels].T[None]
        y = selective_scan_ref(xc[:, seq].transpose(1, 2), dt.transpose(1, 2), -torch.exp(sd["A_log"]), B_k,
                               C.transpose(1, 2), sd["D"], None, delta_bias=sd["dt_proj.bias"], delta_softplus=True,
                               gap=torch.tensor([gaps]) if decay else None)
        out = torch.zeros_like(y)
        out[:, :, seq] = y
        total = total + out.transpose(1, 2)
    return (total * F.silu(z)) @ sd["out_proj.weight"].T + sd["out_proj.bias"]


@pytest.mark.parametrize("align", [None, "hold", "decay"])
@pytest.mark.parametrize("grid", [(6, 5), (5, 6)])
def test_mixer_on_surviving_tokens_matches_the_explicit_rules(align, grid):
    torch.manual_seed(0)
    mixer = randomize(PlainMamba2D(12, bias=True))
    keep = sorted(torch.randperm(grid[0] * grid[1])[:17].tolist())
    hidden = torch.randn(1, len(keep), 12)
    ctx = MixerContext(positions=torch.tensor([keep]), grid=grid, align=align)
    with torch.no_grad():
        got = mixer(hidden, ctx)
        expected = reference_pruned_mixer(mixer, hidden, keep, grid, decay=align == "decay")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("align", [None, "decay"])
def test_multi_order_triton_kernel_matches_the_gathered_scans(align):
    """The mixer's one scan_paths call on the 'triton' backend (the interpreter on CPU) against the 'torch'
    backend, which gathers each order, scans and scatters back: outputs and every gradient, pruned and gated."""
    from mambatrim.ops import use_backend

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs the kernel without a GPU
    torch.manual_seed(0)
    mixer = PlainMamba2D(12, bias=True).to(dev)
    positions = torch.stack([torch.randperm(30)[:17].sort().values for _ in range(2)]).to(dev)
    hidden = torch.randn(2, 17, 12, device=dev)
    gate = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]], device=dev)
    results = []
    for backend in ("torch", "triton"):
        mixer.zero_grad()
        x = hidden.clone().requires_grad_()
        ctx = MixerContext(positions=positions, grid=(6, 5), align=align, direction_gate=gate,
                           protected=torch.empty(2, 0, dtype=torch.long, device=dev))
        with use_backend(backend):
            y = mixer(x, ctx)
        (y * torch.linspace(-1, 1, y.numel(), device=dev).view_as(y)).sum().backward()
        results.append([y.detach(), x.grad] + [p.grad.clone() for p in mixer.parameters()])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_mixer_needs_a_grid():
    with pytest.raises(ValueError, match="token grid"):
        PlainMamba2D(8)(torch.randn(1, 4, 8), MixerContext())


# ---------------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("name,published", [("plainmamba_l1", 3.0), ("plainmamba_l2", 8.1), ("plainmamba_l3", 14.4)])
def test_flops_reproduce_the_published_figures(name, published):
    from mambatrim.analysis.flops import count_flops

    report = count_flops(meta_model(name))
    # PlainMamba's counter (mmcv complexity + 4 paths x (9*L*E*N + L*E)) counts every path: both conventions agree
    assert round(report.gflops("paper"), 1) == published
    assert report.gflops("full") == report.gflops("paper")
    assert len(report.layers) == len(meta_model(name).layers) and report.layers[0].tokens == 196
