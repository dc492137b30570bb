"""DyVM: the rearranged + masked training forward equals the token-dropping inference forward, block selection
per sample equals running each sample alone, official checkpoint names load, losses and ratios are right."""
from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():  # the fused-path test runs the Triton kernels in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the kernels

import pytest  # noqa: E402

from mambatrim import create_model, load_checkpoint  # noqa: E402
from mambatrim.models import CheckpointMismatchError  # noqa: E402
from mambatrim.reduce import METHODS, TokenState, apply_method, dyvm  # noqa: E402

NUM_PATCHES = 16  # 64x64 image, 16x16 patches
CLS = NUM_PATCHES // 2


def tiny(seed: int = 0, **opts) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("vim_tiny_patch16_224", depth=6, embed_dim=64, img_size=64, num_classes=10,
                         drop_path_rate=0.0)
    opts.setdefault("pruning_layers", [2, 4])
    return dyvm.apply(model, **opts)


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def fixed_keep(plan: list[list[set[int]]]):
    """Override keeping, per stage and sample, the tokens at the given original sequence positions."""
    def override(stage, log_probs, policy, positions):
        keep = torch.zeros_like(policy)
        for b, kept in enumerate(plan[stage]):
            keep[b] = torch.isin(positions[b], torch.tensor(sorted(kept))).float()
        return keep
    return override


def random_plan(batch: int, counts: list[list[int]], seed: int) -> list[list[set[int]]]:
    """Nested random keep sets (original positions, the class token excluded): counts[stage][sample]."""
    g = torch.Generator().manual_seed(seed)
    patches = [p for p in range(NUM_PATCHES + 1) if p != CLS]
    plan: list[list[set[int]]] = [[] for _ in counts]
    for b in range(batch):
        alive = patches
        for s, per_sample in enumerate(counts):
            pick = torch.randperm(len(alive), generator=g)[: per_sample[b]]
            alive = sorted(alive[i] for i in pick.tolist())
            plan[s].append(set(alive))
    return plan


def run(model, x, mode: str, override=None) -> tuple[torch.Tensor, TokenState]:
    model.train(mode == "train")
    model.reducer.keep_override = override
    with torch.no_grad():
        state = model.forward_tokens(x)
        logits = model.head(state.hidden[torch.arange(x.shape[0]), state.protected[:, 0]])
    return logits, state


def set_static_gates(model, off: list[tuple[int, int]]) -> None:
    """Selectors that switch off the given (layer, direction) pairs for every sample, by a margin that no
    Gumbel noise can flip (so training-mode gates are deterministic too)."""
    with torch.no_grad():
        for layer, sel in enumerate(model.reducer.selectors):
            sel.weight.zero_()
            sel.bias.fill_(60.0)
            for l, d in off:
                if l == layer:
                    sel.bias[d] = -60.0


@pytest.mark.parametrize("keep_ratio", [0.9, 0.7, 0.5])
def test_training_forward_equals_inference_with_the_same_decisions(keep_ratio):
    model = tiny(keep_ratio=keep_ratio, block_ratio=None)
    x = images(3)
    logits_eval, eval_state = run(model, x, "eval")
    # the inference decisions, as original positions per stage, replayed as fixed training decisions
    plan = []
    ratios = model.reducer.token_ratios
    model.eval()
    for k in [int(r * NUM_PATCHES) for r in ratios]:
        assert k < NUM_PATCHES
    recorded: list[list[set[int]]] = []

    def record(stage, log_probs, policy, positions):
        top = log_probs[..., 0].topk(int(ratios[stage] * NUM_PATCHES), dim=1).indices
        recorded.append([set(positions[b, top[b]].tolist()) for b in range(x.shape[0])])
        return torch.zeros_like(policy).scatter_(1, top, 1.0)

    logits_rec, _ = run(model, x, "eval", record)
    torch.testing.assert_close(logits_rec, logits_eval, rtol=0, atol=0)
    plan = recorded
    logits_train, train_state = run(model, x, "train", fixed_keep(plan))
    assert train_state.num_tokens == NUM_PATCHES + 1  # full length in training
    torch.testing.assert_close(logits_train, logits_eval, rtol=1e-5, atol=1e-5)
    n = eval_state.num_tokens
    torch.testing.assert_close(train_state.hidden[:, :n], eval_state.hidden, rtol=1e-5, atol=1e-5)
    assert torch.equal(train_state.positions[:, :n], eval_state.positions)
    assert torch.equal(train_state.mask[:, :n], torch.ones(3, n))
    assert not train_state.mask[:, n:].any()


def test_training_forward_with_per_sample_counts_equals_each_sample_dropped_alone():
    model = tiny(keep_ratio=0.7, block_ratio=0.8)
    set_static_gates(model, off=[(0, 1), (3, 0), (4, 1), (5, 0), (5, 1)])
    counts = [[12, 9, 14, 5], [7, 3, 10, 5]]  # per stage, per sample: kept counts differ within the batch
    plan = random_plan(4, counts, seed=3)
    x = images(4, seed=2)
    logits_train, train_state = run(model, x, "train", fixed_keep(plan))
    assert train_state.protected[:, 0].tolist() == [c // 2 for c in counts[-1]]
    for b in range(4):
        single = [[stage[b]] for stage in plan]
        logits_b, state_b = run(model, x[b:b + 1], "eval", fixed_keep(single))
        n = counts[-1][b] + 1
        assert state_b.num_tokens == n
        torch.testing.assert_close(logits_train[b:b + 1], logits_b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(train_state.hidden[b:b + 1, :n], state_b.hidden, rtol=1e-5, atol=1e-5)
        assert torch.equal(train_state.positions[b, :n], state_b.positions[0])


def test_training_gradients_equal_the_gradients_of_the_token_dropping_forward():
    """What training optimises is what inference runs: with fixed decisions (per-sample counts, directions
    switched off in some layers) the backbone's gradients through the rearranged + masked full-length forward
    equal those through the forward that drops the tokens (each sample alone, summed)."""
    model = tiny(keep_ratio=0.7, block_ratio=0.8)
    set_static_gates(model, off=[(1, 1), (4, 0)])
    counts = [[12, 9, 14], [7, 3, 10]]
    plan = random_plan(3, counts, seed=5)
    x, y = images(3, seed=4), torch.tensor([3, 7, 1])
    backbone = [(n, p) for n, p in model.named_parameters() if not n.startswith("reducer.")]

    def grads(mode: str, xs: torch.Tensor, ys: torch.Tensor, override) -> dict[str, torch.Tensor]:
        model.train(mode == "train")
        model.reducer.keep_override = override
        model.zero_grad(set_to_none=True)
        state = model.forward_tokens(xs)
        logits = model.head(state.hidden[torch.arange(xs.shape[0]), state.protected[:, 0]])
        torch.nn.functional.cross_entropy(logits, ys, reduction="sum").backward()
        return {n: p.grad.clone() for n, p in backbone if p.grad is not None}

    train = grads("train", x, y, fixed_keep(plan))
    alone = [grads("eval", x[b:b + 1], y[b:b + 1], fixed_keep([[stage[b]] for stage in plan])) for b in range(3)]
    assert len(train) > 20
    for name, g in train.items():  # a direction skipped at inference has no gradient there, 0 in training
        ref = sum(a[name] if name in a else torch.zeros_like(g) for a in alone)
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5, msg=name)
    skipped = {"layers.1.mixer.x_proj_b.weight", "layers.4.mixer.x_proj.weight"}
    assert all(train[n].abs().max() == 0 and all(n not in a for a in alone) for n in skipped)


def test_control_in_place_masking_without_rearrangement_does_not_match():
    model = tiny(keep_ratio=0.7, block_ratio=None, rearrange=False)
    x = images(2)
    plan = random_plan(2, [[11, 11], [7, 7]], seed=5)
    logits_eval, _ = run(model, x, "eval", fixed_keep(plan))
    logits_masked, _ = run(model, x, "train", fixed_keep(plan))
    model.reducer.rearrange = True
    logits_rearranged, _ = run(model, x, "train", fixed_keep(plan))
    torch.testing.assert_close(logits_rearranged, logits_eval, rtol=1e-5, atol=1e-5)
    assert (logits_masked - logits_eval).abs().max() > 1e-3


def test_vectorised_rearrangement_matches_a_per_sample_loop():
    model = tiny(keep_ratio=0.7, block_ratio=None)
    counts = [[12, 9, 14], [7, 3, 10]]
    plan = random_plan(3, counts, seed=7)
    _, state = run(model, images(3), "train", fixed_keep(plan))
    for b in range(3):  # the official layout, built sample by sample: kept (cls in the middle), then pruned
        kept = sorted(plan[-1][b])
        half = len(kept) // 2
        head = kept[:half] + [CLS] + kept[half:]
        assert state.positions[b, :len(head)].tolist() == head
        assert sorted(state.positions[b].tolist()) == list(range(NUM_PATCHES + 1))


def test_block_selection_per_sample_at_inference_equals_each_sample_alone():
    model = tiny(keep_ratio=0.7, block_ratio=0.8)
    with torch.no_grad():
        for sel in model.reducer.selectors:
            sel.weight.normal_(0, 0.5)
            sel.bias.zero_()
    x = images(6, seed=4)
    model.eval()
    logits, _ = run(model, x, "eval")
    gates = torch.stack([m.mixer.last_stats["gate"] for m in model.layers])  # (layers, B, 2)
    assert gates.shape == (6, 6, 2)
    assert 0 < gates.mean() < 1
    assert (gates != gates[:, :1]).any(), "the test needs samples that select different directions"
    for b in range(6):
        alone, _ = run(model, x[b:b + 1], "eval")
        torch.testing.assert_close(logits[b:b + 1], alone, rtol=1e-5, atol=1e-5)
    # and equals computing both directions and multiplying by the 0/1 gate (the training-time path)
    dense_gates = gates.clone()
    original = model.reducer.mixer_context

    def multiply_instead_of_skip(i, state):
        ctx = original(i, state)
        return ctx.__class__(token_mask=ctx.token_mask, protected=ctx.protected, direction_gate=dense_gates[i],
                             skip_gated=False)

    model.reducer.mixer_context = multiply_instead_of_skip
    multiplied, _ = run(model, x, "eval")
    torch.testing.assert_close(logits, multiplied, rtol=1e-5, atol=1e-5)


def test_inference_keeps_int_ratio_tokens_per_stage():
    model = tiny(keep_ratio=0.7, block_ratio=0.8)
    run(model, images(2), "eval")
    tokens = [layer.mixer.last_stats["tokens"] for layer in model.layers]
    k1, k2 = int(0.7 * NUM_PATCHES), int(0.7 ** 2 * NUM_PATCHES)
    assert tokens == [17, 17, k1 + 1, k1 + 1, k2 + 1, k2 + 1]
    assert model.reducer.flops_overhead(tokens, 64) == pytest.approx(
        (17 - 1 + k1) * model.reducer.predictors[0].macs_per_token() + 6 * 256 * 2)


def test_training_gradients_reach_predictors_and_selectors():
    model = tiny(keep_ratio=0.7, block_ratio=0.8)
    teacher = create_model("vim_tiny_patch16_224", depth=6, embed_dim=64, img_size=64, num_classes=10).eval()
    model.train()
    x = images(4)
    state = model.forward_tokens(x)
    with torch.no_grad():
        teacher_state = teacher.forward_tokens(x)
    losses = model.reducer.extra_losses(state, teacher_state)
    assert set(losses) == {"dyvm_token_ratio", "dyvm_block_ratio", "dyvm_token_distill"}
    logits = model.head(state.hidden[torch.arange(4), state.protected[:, 0]])
    (logits.logsumexp(-1).sum() + sum(losses.values())).backward()
    for s, predictor in enumerate(model.reducer.predictors):
        assert predictor.out_conv[-2].weight.grad.abs().sum() > 0, f"predictor {s} gets no gradient"
    assert model.reducer.selectors[3].weight.grad.abs().sum() > 0


def test_extra_losses_follow_the_official_formula():
    model = tiny(keep_ratio=0.7, block_ratio=0.8)
    plan = random_plan(2, [[12, 9], [7, 3]], seed=1)
    _, state = run(model, images(2), "train", fixed_keep(plan))
    model.train()
    losses = model.reducer.extra_losses(state)
    r1, r2 = 0.7, 0.49
    expect = 10 * (((12 / 16 - r1) ** 2 + (9 / 16 - r1) ** 2) / 2 + ((7 / 16 - r2) ** 2 + (3 / 16 - r2) ** 2) / 2) / 2
    assert losses["dyvm_token_ratio"].item() == pytest.approx(expect, rel=1e-5)
    gates = torch.stack([g.mean() for g in state.extras["dyvm_gates"]]).mean()
    assert losses["dyvm_block_ratio"].item() == pytest.approx(10 * (gates.item() - 0.8) ** 2, rel=1e-5)


def test_token_distillation_aligns_teacher_tokens_by_original_position():
    bsz, dim = 2, 3
    dense_pos = torch.arange(NUM_PATCHES + 1).expand(bsz, -1)
    teacher = TokenState(hidden=dense_pos[..., None].float().expand(-1, -1, dim), residual=None,
                         positions=dense_pos, protected=torch.full((bsz, 1), CLS))
    positions = torch.stack([torch.randperm(NUM_PATCHES + 1) for _ in range(bsz)])
    student = TokenState(hidden=positions[..., None].float().expand(-1, -1, dim), residual=None,
                         positions=positions, protected=torch.tensor([[0], [5]]),
                         mask=torch.ones(bsz, NUM_PATCHES + 1), extras={"dyvm_num_patches": NUM_PATCHES})
    assert dyvm.token_distill_mse(student, teacher).item() == 0.0
    student.hidden = student.hidden + 1.0
    student.hidden[:, -3:] += 100.0  # masked tokens must not count
    student.mask[:, -3:] = 0
    assert dyvm.token_distill_mse(student, teacher).item() == pytest.approx(1.0)


def test_official_checkpoint_names_load():
    source = tiny(seed=1, keep_ratio=0.7, block_ratio=0.8)
    with torch.no_grad():
        for p in source.reducer.parameters():
            p.normal_()
    official = {}
    for key, value in source.state_dict().items():
        if key.startswith("reducer.predictors."):
            key = "score_predictors." + key[len("reducer.predictors."):]
        elif key.startswith("reducer.selectors."):
            layer, rest = key[len("reducer.selectors."):].split(".", 1)
            key = f"layers.{layer}.mixer.block_head.{rest}"
        official[key] = value
    assert "score_predictors.1.out_conv.4.weight" in official
    assert "layers.5.mixer.block_head.bias" in official
    target = tiny(seed=2, keep_ratio=0.7, block_ratio=0.8)
    load_checkpoint(target, {"model": official})
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    dense = create_model("vim_tiny_patch16_224", depth=6, embed_dim=64, img_size=64, num_classes=10)
    with pytest.raises(CheckpointMismatchError, match="DyVM"):
        load_checkpoint(dense, {"model": official})
    dense_sd = {k: v for k, v in source.state_dict().items() if not k.startswith("reducer.")}
    load_checkpoint(dense, dense_sd)  # the mapper leaves other checkpoints alone


def test_registered_and_bad_options_are_refused():
    assert METHODS["dyvm"].learned  # the demo fine-tunes it before measuring
    model = create_model("vim_tiny_patch16_224", depth=6, embed_dim=64, img_size=64, num_classes=10)
    apply_method(model, "dyvm", keep_ratio=0.9, pruning_layers=[2, 4])
    assert model.reducer.token_ratios == pytest.approx([0.9, 0.81])
    with pytest.raises(ValueError, match="pruning_layers"):
        dyvm.apply(model, pruning_layers=[0, 3])
    with pytest.raises(ValueError, match="keep_ratio"):
        dyvm.apply(model, keep_ratio=1.5)
    with pytest.raises(ValueError, match="would keep 0"):
        dyvm.apply(model, keep_ratio=0.05, pruning_layers=[2]).eval()(images(1))
    assert dyvm.default_pruning_layers(24) == [6, 12, 18]


def test_skip_gated_inference_on_the_fused_triton_path_matches_the_torch_path():
    """Per-image direction skipping with the selectors' gates computed by the fused class-token gate kernel
    equals the per-direction PyTorch path (where the gate is the fp32 linear map, thresholded)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    from mambatrim.ops import use_backend

    torch.manual_seed(0)
    model = create_model("vim_tiny_patch16_224", depth=3, embed_dim=32, img_size=32, num_classes=10,
                         drop_path_rate=0.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dyvm.apply(model.to(device), keep_ratio=0.7, block_ratio=0.8, pruning_layers=[2]).eval()
    with torch.no_grad():
        for sel in model.reducer.selectors:
            sel.weight.normal_(0, 1.0)
            sel.bias.zero_()
        model.reducer.selectors[0].bias.fill_(40.0)  # layer 0: both directions for every image
    x = images(6, seed=3)[:, :, :32, :32].to(device)
    with torch.no_grad():
        with use_backend("torch"):
            reference = model(x)
            want = torch.stack([layer.mixer.last_stats["gate"] for layer in model.layers])
        with use_backend("triton"):
            fused = model(x)
    gates = torch.stack([layer.mixer.last_stats["gate"] for layer in model.layers])
    assert torch.equal(gates, want)
    assert (gates[1:] != gates[1:, :1]).any(), "the test needs images that select different directions"
    assert (gates[1:] == 0).all(-1).any(), "and one that runs no direction at some layer"
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


def test_flops_match_the_paper_convention_figures():
    """Vim-S at 224: dense 5.08 G; DyVM rho 0.7 at a nominal block ratio 0.8: 3.24 G (the official counter's
    formula on 197/138/97/68 tokens + predictors). Built on the meta device: nothing is computed."""
    with torch.device("meta"):
        model = create_model("vim_small_patch16_224")
    from mambatrim.analysis.flops import count_flops

    assert count_flops(model).gflops("paper") == pytest.approx(5.08, abs=0.005)
    dyvm.apply(model, keep_ratio=0.7, block_ratio=None)  # no selectors: their gates need real values
    report = dyvm.count_flops(model, block_ratio=0.8)
    assert report.tokens_per_layer == [197] * 6 + [138] * 6 + [97] * 6 + [68] * 6
    assert report.gflops("paper") == pytest.approx(3.239, abs=0.002)
    assert report.reducer == (196 + 137 + 96) * (384 * 384 + 384 * 192 + 192 * 96 + 96 * 2)
    assert dyvm.count_flops(model).gflops("paper") == pytest.approx(3.35, abs=0.01)  # all directions ran


def test_untrained_predictors_keep_the_target_share_in_training():
    """Initialised predictors keep about rho of the alive tokens per stage under Gumbel sampling (cumulatively
    rho, rho^2), close to what top-k keeps at inference; with zero biases (the released init) they keep ~half."""
    torch.manual_seed(0)
    fractions = {}
    for init in (True, False):
        model = create_model("vim_tiny_patch16_224", depth=6, embed_dim=64, img_size=64, num_classes=10)
        dyvm.apply(model, keep_ratio=0.7, block_ratio=None, pruning_layers=[2, 4], predictor_init_keep=init)
        model.train()
        state = model.forward_tokens(images(64))
        fractions[init] = [d.mean().item() for d in state.extras["dyvm_decisions"]]
    assert fractions[True] == pytest.approx([0.7, 0.49], abs=0.04)
    assert fractions[False][0] == pytest.approx(0.5, abs=0.05)


def test_inference_top_k_path_equals_the_general_keep_path() -> None:
    """The inference fast path (top-k indices sorted, no keep mask) gives the same logits and token positions as
    the general path fed with the same top-k decisions as a keep mask."""
    torch.manual_seed(0)
    model = create_model("vim_tiny_patch16_224", depth=6, embed_dim=64, img_size=64, num_classes=10,
                         drop_path_rate=0.0)
    dyvm.apply(model, keep_ratio=0.6, block_ratio=None, pruning_layers=[2, 4]).eval()
    for predictor in model.reducer.predictors:  # random scores, not the flat initial ones
        torch.nn.init.normal_(predictor.out_conv[-2].weight, std=1.0)
    x = images(3)
    with torch.no_grad():
        fast = model.forward_tokens(x)
        fast_logits = model(x)

        def top_k(stage, log_probs, policy, positions):
            k = int(model.reducer.token_ratios[stage] * model.patch_embed.num_patches)
            return torch.zeros_like(policy).scatter_(1, log_probs[..., 0].topk(k, dim=1).indices, 1.0)

        model.reducer.keep_override = top_k
        general = model.forward_tokens(x)
        general_logits = model(x)
    assert torch.equal(fast.positions, general.positions) and torch.equal(fast.protected[:, 0], general.protected[:, 0])
    torch.testing.assert_close(fast_logits, general_logits, rtol=0, atol=0)


def test_predictor_equals_the_concatenated_local_global_formulation() -> None:
    """DynamicViT/DyVM predictor: out_conv([local, mean of alive global]) -- computed here with the explicit
    concatenation, against the module's broadcast form; dead tokens do not enter the global mean."""
    torch.manual_seed(0)
    predictor = dyvm.TokenPredictor(32)
    x, policy = torch.randn(3, 7, 32), (torch.rand(3, 7) > 0.3).float()
    h = predictor.in_conv(x)
    local, glob = h[..., :16], h[..., 16:]
    glob = (glob * policy[..., None]).sum(1, keepdim=True) / (policy.sum(1, keepdim=True)[..., None] + 1)
    expected = predictor.out_conv(torch.cat([local, glob.expand_as(local)], dim=-1))
    torch.testing.assert_close(predictor(x, policy), expected, rtol=1e-5, atol=1e-6)


def test_predictor_scores_in_fp32_under_autocast() -> None:
    """Keep scores only rank tokens; under bf16 autocast they would tie and top-k would break ties arbitrarily
    (a trained DyVM model lost 6 points on a GPU that way). The predictor ignores autocast: same fp32 scores,
    and bf16 inputs give what their fp32 values give."""
    torch.manual_seed(0)
    predictor = dyvm.TokenPredictor(64)
    x, policy = torch.randn(2, 50, 64), torch.ones(2, 50)
    reference = predictor(x, policy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scored = predictor(x, policy)
        from_bf16 = predictor(x.bfloat16(), policy)
        plain = predictor.out_conv[1](predictor.out_conv[0](predictor.in_conv(x)[..., :32].repeat(1, 1, 2)))
    assert plain.dtype == torch.bfloat16  # control: this autocast does run Linear layers in bf16
    assert scored.dtype == torch.float32 and torch.equal(scored, reference)
    torch.testing.assert_close(from_bf16, predictor(x.bfloat16().float(), policy))


def test_predictor_precision_option_and_its_tf32_switch_restores_the_global_setting() -> None:
    model = create_model("vim_tiny_patch16_224", depth=4, embed_dim=64, img_size=64, num_classes=10)
    dyvm.apply(model, pruning_layers=[2], predictor_precision="fp32")
    assert [p.precision for p in model.reducer.predictors] == ["fp32"]
    dyvm.apply(model, pruning_layers=[2])
    assert [p.precision for p in model.reducer.predictors] == ["tf32"]  # the default
    with pytest.raises(ValueError, match="predictor_precision"):
        dyvm.apply(model, predictor_precision="bf16")
    matmul = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, attr)
    with dyvm._matmul_tf32(True):
        assert getattr(matmul, attr) in ("tf32", True)
    assert getattr(matmul, attr) == before
    with pytest.raises(RuntimeError, match="boom"), dyvm._matmul_tf32(True):
        raise RuntimeError("boom")
    assert getattr(matmul, attr) == before  # restored on errors too


def test_inference_gate_is_the_fp32_linear_selector_thresholded_at_zero() -> None:
    torch.manual_seed(0)
    model = tiny(keep_ratio=0.7, block_ratio=0.8)
    sel = model.reducer.selectors[1]
    with torch.no_grad():
        sel.weight.normal_(0, 1.0)
    x = torch.randn(5, sel.in_features)
    want = torch.nn.functional.linear(x, sel.weight, sel.bias)
    torch.testing.assert_close(sel(x), want)  # training: the Linear itself, fp32 logits
    model.eval()
    state = TokenState(hidden=torch.zeros(5, 3, 64), residual=None, positions=torch.arange(3).expand(5, -1),
                       protected=torch.ones(5, 1, dtype=torch.long))
    gate = model.reducer.mixer_context(1, state).direction_gate
    assert isinstance(gate, dyvm.LinearDirectionGate) and gate.weight is sel.weight
    assert torch.equal(gate(x), (want > 0).float())
    assert 0 < gate(x).mean() < 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 product of the bf16 input, not a bf16 GEMM
        amp = gate.logits(x.bfloat16())
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, torch.nn.functional.linear(x.bfloat16().float(), sel.weight, sel.bias))


def test_dyvm_with_the_static_pruners_kept_set_equals_the_static_pruner() -> None:
    """Control for the CIFAR-10 comparison (docs/dyvm.md): DyVM's pruning (eval, tokens dropped, class token
    re-inserted in the middle) given the static pruner's kept tokens yields the static pruner's logits, so
    their accuracy gap comes from which tokens are kept, not from the machinery."""
    from mambatrim.reduce import apply_method

    x = images(3)
    static = copy.deepcopy(tiny(block_ratio=None)).set_reducer(None)
    apply_method(static, "prune_static", keep=0.75, layers=[2])
    static.eval()
    with torch.no_grad():
        kept_state = static.forward_tokens(x)
        expected = static.head(kept_state.hidden[torch.arange(3), kept_state.protected[:, 0]])
    kept = [set(p.tolist()) - {CLS} for p in kept_state.positions]
    model = tiny(block_ratio=None, keep_ratio=len(kept[0]) / NUM_PATCHES, pruning_layers=[2])
    logits, state = run(model, x, "eval", fixed_keep([kept]))
    assert torch.equal(state.positions, kept_state.positions)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_coverage_grid_spreads_the_share_evenly_over_alive_tokens() -> None:
    alive = torch.tensor([[1.0] * 10, [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]])
    on = dyvm.coverage_grid(alive, 0.5)
    assert on[0].tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]  # every second token, 5 of 10
    assert on[1].sum() == 4 and bool((on[1] <= alive[1]).all())  # 4 of the 7 alive, never a dead one
    ranks = (torch.cumsum(alive[1], 0) - 1)[on[1] > 0]
    assert ranks.tolist() == [0, 2, 4, 6]  # every second alive token (ranks), 7 * 0.5 = 3.5 -> 4
    for share in (0.3, 0.7, 0.9):
        assert int(dyvm.coverage_grid(torch.ones(1, 196), share).sum()) == round(196 * share + 1e-9)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_strong_coverage_prior_keeps_the_evenly_spread_grid(mode: str) -> None:
    """With an overwhelming prior, training (Gumbel) and inference (top-k) keep exactly the grid tokens of
    every stage, whatever the predictor says; with the prior off (the default) the keep logits are the
    predictor's own."""
    model = tiny(keep_ratio=0.5, block_ratio=None, coverage_prior=1e4)
    for predictor in model.reducer.predictors:  # confident random scores the prior must override
        torch.nn.init.normal_(predictor.out_conv[-2].weight, std=3.0)
    _, state = run(model, images(3), mode)
    patches = [p for p in range(NUM_PATCHES + 1) if p != CLS]
    grid1 = patches[0::2]  # 8 of 16, every second patch
    grid2 = grid1[0::2]  # 4 of 8
    kept = state.positions if mode == "eval" else state.positions[:, :5]  # train: kept first (cls at middle)
    for b in range(3):
        got = sorted(p for p in kept[b].tolist() if p != CLS)
        assert got == grid2
    if mode == "train":
        assert state.extras["dyvm_decisions"][0][0].tolist() == [float(p in grid1) for p in patches]
    off = tiny(keep_ratio=0.5, block_ratio=None)
    assert off.reducer.coverage_prior == 0.0
    lp = torch.randn(2, 16, 2).log_softmax(-1)
    assert off.reducer._with_prior(0, lp, torch.ones(2, 16)) is lp
    with pytest.raises(ValueError, match="coverage_prior"):
        tiny(coverage_prior=-1.0)
