"""Dynamic Vision Mamba (DyVM, Wu et al. 2025): learned token pruning with rearrangement + dynamic selection of
SSM directions ("blocks"), as a :class:`~mambatrim.contract.Reducer`.

Token pruning: before each pruning layer (default 6, 12, 18) a local+global predictor scores the patch tokens
from the residual stream (hidden + residual, class token excluded). Stage ``s`` keeps ``rho**(s+1)`` of the
*original* patch count.

* Training: a hard straight-through Gumbel-softmax decides per token; the sequence is **rearranged** (kept
  tokens in their original order, the protected tokens placed among them by the backbone's layout per sample
  -- Vim's class token at the middle, VideoMamba's first, MambaReg's registers spread evenly -- pruned tokens
  moved to the tail) and the pruned tail is masked in every later mixer (before and after the local conv, both
  directions). With pruned tokens at the tail, the forward scan reaches them only after every kept token and
  the backward scan starts on them with a zero state and zero input, so the kept tokens compute exactly what
  they compute with the pruned tokens removed. The rearrangement is one stable sort per stage (no loop).
* Inference: top-``int(ratio*N)`` of the keep score, sorted, gathered; the protected tokens re-inserted by the
  same layout (Vim: the class token at k//2).
  Pruned tokens are physically removed.

Block selection: per layer a linear selector reads the class token's ``in_proj`` output (the registers' mean,
or all tokens' without a class token: :func:`~mambatrim.contract.gate_feature`) and gives two gates
[forward, backward]. Training: Gumbel-sigmoid (tau 2) straight-through, both directions computed and gated.
Inference: logit > 0 and a direction runs only for the samples that selected it.

Usage::

    from mambatrim.reduce import dyvm
    model = dyvm.apply(model, keep=0.7, block_ratio=0.8)         # fine-tune (model.train())
    dyvm.deploy(model)                                            # inference: tokens dropped, directions skipped
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ..contract import (LinearDirectionGate, MixerContext, Reducer, TokenState, insert_at, layout_slots,
                        protected_mask, take_rows, token_mse, unprotected_index)
from ..models.checkpoint import CheckpointMismatchError, register_key_mapper
from ..ops import get_backend
from ..ops import policy as fast_paths
from ..validation import check
from .options import method_options
from .registry import MethodSpec, register_method

# keep decision override: (stage, log_probs (B, N, 2), policy (B, N), positions (B, N)) -> keep (B, N) 0/1;
# positions are the scored tokens' original sequence indices (fixed decisions in tests, random/static ablations)
KeepOverride = Callable[[int, Tensor, Tensor, Tensor], Tensor]

# At inference on the 'triton' backend two predictor steps run as one kernel each, behind the policy settings
# ``fused_predictor_norm`` (add + LayerNorm: with the fused row gather +2.6-3.0 %, dyvm_speed_fused_steps.md) and
# ``fused_predictor_head`` (the head after its first linear: +0.6-0.8 %, dyvm_speed.md)


@contextmanager
def _matmul_tf32(enabled: bool) -> Iterator[None]:
    """CUDA fp32 matmuls with TF32 inputs inside the block (the global switch, restored after)."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has the fp32_precision switch; older versions only allow_tf32
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    old = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, old)


class BlockSelector(nn.Linear):
    """Per-layer scan-direction selector: the gate feature of the ``in_proj`` output (B, 2E) (the class token's
    row; :class:`~mambatrim.contract.DirectionGate`) -> (B, 2) fp32 logits
    (forward, backward). A plain Linear (the released parameter names); at inference DyVM hands its weights to
    the mixer as a :class:`~mambatrim.contract.LinearDirectionGate` instead of calling it."""

    def forward(self, feature: Tensor) -> Tensor:
        return super().forward(feature.to(self.weight.dtype)).float()


class TokenPredictor(nn.Module):
    """DynamicViT-style local + global keep predictor: (B, N, D) tokens, (B, N) alive policy -> (B, N, 2)
    log-probabilities, index 0 = keep. The global half averages alive tokens only (denominator + 1, as DyVM).

    Module layout mirrors the released DyVM predictors so their weights load by a plain prefix rename.
    """

    def __init__(self, dim: int, precision: str = "tf32") -> None:
        super().__init__()
        self.precision = precision  # of the matmuls on a GPU: 'tf32' or 'fp32' (see forward)
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, policy: Tensor, residual: Tensor | None = None) -> Tensor:
        """Scores of ``x`` (or of ``residual + x``, the residual stream, when ``residual`` is given)."""
        # fp32 outputs, also under autocast: the scores only rank tokens, and in bf16 close scores collapse into
        # ties that top-k and Gumbel decisions then break arbitrarily (a DyVM model lost 6 points of top-1 when
        # its predictor ran in bf16, the backbone being unaffected). On a GPU the matmuls take TF32 inputs by
        # default (fp32 accumulation and outputs, so no such ties): plain fp32 GEMMs run on the CUDA cores and
        # cost ~5 % of a DyVM-Vim-S forward for ~1 % of its FLOPs. ``predictor_precision='fp32'`` keeps them.
        if not torch.amp.is_autocast_available(x.device.type):  # e.g. 'meta' (FLOPs counting)
            return self._scores(x, policy.float(), residual)
        with torch.autocast(x.device.type, enabled=False), _matmul_tf32(x.is_cuda and self.precision == "tf32"):
            return self._scores(x, policy.float(), residual)

    def _scores(self, x: Tensor, policy: Tensor, residual: Tensor | None) -> Tensor:
        norm = self.in_conv[0]
        # the fused kernels run at inference where the 'triton' backend does (the switches pick which)
        fused = not torch.is_grad_enabled() and get_backend(x.device.type) == "triton"
        if residual is not None and fused and fast_paths.get("fused_predictor_norm"):
            from ..ops.triton_norm import add_layer_norm_triton  # noqa: PLC0415 (needs triton)

            x = self.in_conv[1:](add_layer_norm_triton(x, residual, norm.weight, norm.bias, norm.eps))
        else:
            # one add with type promotion (an fp32 residual, bf16 hidden): no fp32 copy of the hidden states first
            x = self.in_conv((x if residual is None else residual + x).float())
        half = x.shape[-1] // 2
        local, glob = x[..., :half], x[..., half:]
        first = self.out_conv[0]
        if fused and fast_paths.get("fused_predictor_head"):
            from ..ops.triton_head import keep_head_triton  # noqa: PLC0415 (needs triton)

            # the alive-weighted mean of the global half as one batched product, then the head in one kernel
            p = policy.to(x.dtype)
            glob = torch.bmm(p[:, None, :], glob) / (p.sum(1)[:, None, None] + 1)
            bias = F.linear(glob[:, 0], first.weight[:, half:], first.bias)
            return keep_head_triton(local, bias, first.weight[:, :half], self.out_conv[2].weight,
                                    self.out_conv[2].bias, self.out_conv[4].weight, self.out_conv[4].bias,
                                    precision="tf32" if x.is_cuda and self.precision == "tf32" else "fp32")
        p = policy[..., None].to(x.dtype)
        glob = (glob * p).sum(1, keepdim=True) / (p.sum(1, keepdim=True) + 1)
        # out_conv[0] applied to [local, glob] without materialising the concatenation: the global half is the
        # same for every token, so its product is computed once per sample and broadcast
        x = F.linear(local, first.weight[:, :half]) + F.linear(glob, first.weight[:, half:], first.bias)
        return self.out_conv[1:](x)

    def macs_per_token(self) -> int:
        return sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))


def gumbel_sigmoid_hard(logits: Tensor, tau: float, threshold: float = 0.5) -> Tensor:
    """Independent Bernoulli gates: hard 0/1 forward, gradient of sigmoid((logits + logistic noise) / tau)."""
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)  # g1 - g2 ~ Logistic(0, 1)
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft


@dataclass(frozen=True)
class DyVMConfig:
    """DyVM's options, validated on construction (defaults: the paper's Vim-S recipe).

    keep:           rho: stage s keeps rho**(s+1) of the patch tokens (alias keep_ratio; ``None``: no token
                    pruning); ``token_ratios`` gives every stage's share instead.
    block_ratio:    target fraction of executed scan directions (``None``: no block selection).
    layers:         blocks to prune before (alias pruning_layers; default a quarter, half and three quarters of
                    the depth: 6, 12, 18 of 24).
    coverage_prior: > 0 (our extension): the keep logit of each alive token gets +b if it lies on an evenly
                    spread grid of the stage's share of the alive tokens (in sequence order), -b otherwise, so the
                    predictor starts from static evenly-spread pruning and learns deviations; 0 = the paper's.
    rearrange:      False masks pruned tokens in place during training (DynamicViT style): an ablation, inexact
                    for SSMs.
    predictor_init_keep: start each stage keeping its target share of the alive tokens (rho of them), not half:
                    with zero-bias predictors (the released code) the first Gumbel decisions keep ~50 % per stage
                    (50/25/12 % cumulatively instead of 70/49/34 %), far from what top-k keeps at inference.
    The loss weights, temperatures, selector bias and predictor precision are the paper's knobs.
    """

    keep: float | None = 0.7
    block_ratio: float | None = 0.8
    layers: Sequence[int] | None = None
    token_ratios: Sequence[float] | None = None
    token_loss_weight: float = 10.0
    block_loss_weight: float = 10.0
    distill_weight: float = 0.5
    token_tau: float = 1.0
    block_tau: float = 2.0
    block_threshold: float = 0.5
    selector_init_bias: float = 5.0
    rearrange: bool = True
    predictor_init_keep: bool = True
    coverage_prior: float = 0.0
    predictor_precision: str = "tf32"

    def __post_init__(self) -> None:
        if self.keep is not None:
            check(self.keep, "dyvm: keep (keep_ratio, rho)", "fraction")
        if self.block_ratio is not None:
            check(self.block_ratio, "dyvm: block_ratio", "probability")
        if self.token_tau <= 0 or self.block_tau <= 0:
            raise ValueError(f"dyvm: temperatures must be > 0, got token_tau={self.token_tau}, "
                             f"block_tau={self.block_tau}")
        if self.predictor_precision not in ("tf32", "fp32"):
            raise ValueError(f"dyvm: predictor_precision must be 'tf32' or 'fp32', got {self.predictor_precision!r}")
        if self.coverage_prior < 0:
            raise ValueError(f"dyvm: coverage_prior must be >= 0, got {self.coverage_prior}")

    def stages(self, depth: int) -> tuple[list[int], list[float]]:
        """(pruning layers, cumulative token ratio per stage) for a model of ``depth`` blocks."""
        if self.keep is None and self.token_ratios is None:
            return [], []
        layers = list(self.layers) if self.layers is not None else default_pruning_layers(depth)
        if self.token_ratios is not None:
            ratios = [float(r) for r in self.token_ratios]
        else:
            ratios = [float(self.keep) ** (s + 1) for s in range(len(layers))]  # type: ignore[arg-type]
        _check_stages(layers, ratios, depth)
        return layers, ratios


class DyVMReducer(Reducer):
    """DyVM token pruning + block selection. Parameters: ``predictors`` (one per stage) and ``selectors`` (one
    ``Linear(2*d_inner, paths)`` per layer, one gate per scan path: Vim's 2 directions, PlainMamba's 4 orders;
    or ``None`` when block selection is off). ``protected``: the model's protected tokens per image (its class
    token, registers), which the predictors do not score."""

    def __init__(self, embed_dim: int, d_inner: int, depth: int, config: DyVMConfig | None = None,
                 protected: int = 1, paths: int = 2) -> None:
        super().__init__()
        config = config or DyVMConfig()
        self.config, self.depth, self.protected = config, depth, int(protected)
        layers, ratios = config.stages(depth)
        self.pruning_layers, self.token_ratios = layers, ratios
        self.block_ratio = None if config.block_ratio is None else float(config.block_ratio)
        self.token_loss_weight, self.block_loss_weight = float(config.token_loss_weight), float(config.block_loss_weight)
        self.distill_weight = float(config.distill_weight)
        self.token_tau, self.block_tau = float(config.token_tau), float(config.block_tau)
        self.block_threshold = config.block_threshold
        self.predictors = nn.ModuleList(TokenPredictor(embed_dim, config.predictor_precision) for _ in layers)
        if config.predictor_init_keep:
            with torch.no_grad():
                previous = 1.0
                for predictor, ratio in zip(self.predictors, ratios):
                    p = min(max(ratio / previous, 1e-3), 1 - 1e-3)
                    predictor.out_conv[-2].bias.copy_(torch.tensor([math.log(p), math.log1p(-p)]))
                    previous = ratio
        self.selectors: nn.ModuleList | None = None
        if self.block_ratio is not None:
            self.selectors = nn.ModuleList(BlockSelector(2 * d_inner, paths) for _ in range(depth))
            with torch.no_grad():
                for sel in self.selectors:
                    sel.weight.zero_()
                    sel.bias.fill_(config.selector_init_bias)
        self.coverage_prior = float(config.coverage_prior)
        self.rearrange = bool(config.rearrange)
        self.keep_override: KeepOverride | None = None

    # ------------------------------------------------------------------ forward hooks
    def begin(self, state: TokenState) -> TokenState:
        state.extras["dyvm_num_patches"] = state.num_tokens - state.num_protected
        state.extras["dyvm_decisions"] = []
        state.extras["dyvm_gates"] = []
        state.extras["dyvm_tokens"] = []
        if self.training and self.predictors:
            state = state.replace(mask=state.hidden.new_ones(state.hidden.shape[:2], dtype=torch.float32))
        return state

    def before_layer(self, layer_idx: int, state: TokenState) -> TokenState:
        if layer_idx not in self.pruning_layers:
            return state
        stage = self.pruning_layers.index(layer_idx)
        if state.residual is None:
            raise ValueError("dyvm: pruning needs a residual stream (pruning layers must be >= 1)")
        bsz, length = state.hidden.shape[:2]
        num_patches = state.extras["dyvm_num_patches"]
        k = int(self.token_ratios[stage] * num_patches)
        if not self.training and self.keep_override is None:
            return self._prune_top_k(stage, state, k)
        count = state.num_protected
        others = unprotected_index(state.protected, length)
        stream = take_rows(state.residual + state.hidden, others)
        policy = state.mask.gather(1, others) if state.mask is not None else stream.new_ones(bsz, length - count)
        log_probs = self._with_prior(stage, self.predictors[stage](stream, policy), policy)
        if self.keep_override is not None:
            scored = state.positions.gather(1, others)
            keep = self.keep_override(stage, log_probs, policy, scored).to(policy.dtype) * policy
        else:  # training
            keep = F.gumbel_softmax(log_probs.float(), tau=self.token_tau, hard=True)[..., 0] * policy
        kept = keep > 0.5
        order = torch.argsort((~kept).to(torch.float32), dim=1, stable=True)  # kept first, original order
        num_keep = kept.sum(1)
        if self.training and not self.rearrange:
            state.extras["dyvm_decisions"].append(keep)
            mask = state.mask.scatter(1, others, keep) if state.mask is not None else None
            new = state.replace(mask=mask)
        elif self.training:
            state.extras["dyvm_decisions"].append(keep)
            # [kept tokens with the protected ones placed by the layout, pruned tokens]
            slots = layout_slots(state.protected_layout, num_keep, count)
            index = insert_at(others.gather(1, order), state.protected, slots)
            new_keep = keep.gather(1, order)
            mask = insert_at(new_keep, new_keep.new_ones(bsz, count), slots)
            new = state.gather(index, protected=slots).replace(mask=mask)
        else:  # inference with overridden decisions
            if not bool((num_keep == num_keep[0]).all()):
                raise ValueError("dyvm: at inference every sample must keep the same number of tokens")
            n = int(num_keep[0])
            slots = layout_slots(state.protected_layout, torch.full_like(num_keep, n), count)
            index = insert_at(others.gather(1, order[:, :n]), state.protected, slots)
            new = state.gather(index, protected=slots).replace(mask=None)
        state.extras["dyvm_tokens"].append(num_keep.detach())
        return new

    def _prune_top_k(self, stage: int, state: TokenState, k: int) -> TokenState:
        """Inference: keep the top-k patch tokens in their original order, the protected tokens placed by the
        backbone's layout (Vim: the class token back at the middle).

        The predictor scores the whole sequence with the protected tokens given zero weight in its global pooling
        and excluded from the top-k, which equals scoring the patch tokens alone without copying them out first."""
        bsz, length = state.hidden.shape[:2]
        count = state.num_protected
        if not 1 <= k <= length - count:
            raise ValueError(f"dyvm: stage {stage} would keep {k} of {length - count} tokens (ratio "
                             f"{self.token_ratios[stage]:.4g} of {state.extras['dyvm_num_patches']} patches); "
                             "use a larger ratio")
        is_protected = protected_mask(state.protected, length)
        alive = (~is_protected).float()
        log_probs = self._with_prior(stage, self.predictors[stage](state.hidden, alive, state.residual), alive)
        score = log_probs[..., 0].masked_fill(is_protected, float("-inf"))
        top = score.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # sequence indices, in order
        kept = torch.full((bsz,), k, dtype=torch.long, device=top.device)
        state.extras["dyvm_tokens"].append(kept)
        slots = layout_slots(state.protected_layout, kept, count)
        return state.gather(insert_at(top, state.protected, slots), protected=slots).replace(mask=None)

    def stage_grid(self, stage: int, alive: Tensor) -> Tensor:
        """(B, N) 0/1: the alive tokens on the coverage prior's grid at ``stage`` (the stage's share of the tokens
        alive before it)."""
        previous = self.token_ratios[stage - 1] if stage > 0 else 1.0
        return coverage_grid(alive, self.token_ratios[stage] / previous)

    def _with_prior(self, stage: int, log_probs: Tensor, alive: Tensor) -> Tensor:
        """Add the coverage prior (``coverage_prior`` > 0) to the keep logits: +b on the evenly spread grid of
        the stage's relative share of the alive tokens, -b elsewhere; returns log-probabilities again."""
        if self.coverage_prior == 0:
            return log_probs
        on = self.stage_grid(stage, alive)
        shift = (self.coverage_prior * (2.0 * on - 1.0)) * alive  # pruned (not alive) tokens: no shift
        return torch.log_softmax(log_probs + torch.stack([shift / 2, -shift / 2], -1), dim=-1)

    def mixer_context(self, layer_idx: int, state: TokenState) -> MixerContext | None:
        gate: Callable[[Tensor], Tensor] | None = None
        if self.selectors is not None and not self.training:  # logit > 0; the mixer records what ran
            selector = self.selectors[layer_idx]
            gate = LinearDirectionGate(selector.weight, selector.bias)
        elif self.selectors is not None:
            selector, record = self.selectors[layer_idx], state.extras.setdefault("dyvm_gates", [])

            def gate(feature: Tensor) -> Tensor:
                g = gumbel_sigmoid_hard(selector(feature), self.block_tau, self.block_threshold)
                record.append(g)
                return g

        if state.mask is None and gate is None:
            return None
        return MixerContext(token_mask=state.mask, protected=state.protected, direction_gate=gate,
                            skip_gated=gate is not None and not self.training)

    # ------------------------------------------------------------------ losses and costs
    def extra_losses(self, state: TokenState, teacher_state: TokenState | None = None) -> dict[str, Tensor]:
        """Token-ratio MSE (weight/num_stages), block-ratio MSE, and the distillation MSE of the surviving
        patch tokens against the teacher's tokens at the same original positions (weight ``distill_weight``).
        The engine adds the classification loss and ``distill_weight`` x KL(teacher || student)."""
        losses: dict[str, Tensor] = {}
        decisions = state.extras.get("dyvm_decisions") or []
        if decisions:
            terms = [((d.mean(1) - r) ** 2).mean() for d, r in zip(decisions, self.token_ratios)]
            losses["dyvm_token_ratio"] = self.token_loss_weight * torch.stack(terms).sum() / len(terms)
        gates = state.extras.get("dyvm_gates") or []
        if gates and self.training and self.block_ratio is not None:
            losses["dyvm_block_ratio"] = block_ratio_loss(gates, self.block_ratio, self.block_loss_weight)
        if teacher_state is not None and self.distill_weight > 0:
            losses["dyvm_token_distill"] = self.distill_weight * token_distill_mse(state, teacher_state)
        return losses

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        """Predictor MACs (on the tokens entering each pruning layer, protected tokens excluded) + selector MACs."""
        macs = 0.0
        for layer, predictor in zip(self.pruning_layers, self.predictors):
            entering = tokens_per_layer[layer - 1] if layer >= 1 else tokens_per_layer[0]
            macs += (entering - self.protected) * predictor.macs_per_token()
        if self.selectors is not None:
            macs += sum(s.in_features * s.out_features for s in self.selectors)
        return macs

    def extra_repr(self) -> str:
        return (f"pruning_layers={self.pruning_layers}, token_ratios={[round(r, 4) for r in self.token_ratios]}, "
                f"block_ratio={self.block_ratio}")


def block_ratio_loss(gates: list[Tensor], ratio: float, weight: float) -> Tensor:
    """DyVM's block-ratio loss: ``weight * (mean executed share of the gated paths - ratio)^2``, the mean over
    every recorded (B, K) gate of the forward pass."""
    mean_gate = torch.stack([g.mean() for g in gates]).mean()
    return weight * (mean_gate - ratio) ** 2


def coverage_grid(alive: Tensor, share: float) -> Tensor:
    """(B, N) 0/1: alive tokens (``alive`` 0/1, sequence order) on an evenly spread grid keeping ``share`` of them.

    The alive token of rank j (0-based) is on the grid iff a pick (i + 1/2) / share - 1/2 rounds to j, i.e.
    floor((j + 1) * share + 1/2) - floor(j * share + 1/2) = 1: round(n * share) of n alive tokens, evenly spread.
    """
    rank = torch.cumsum(alive, dim=1) - 1
    on = torch.floor((rank + 1) * share + 0.5) - torch.floor(rank * share + 0.5)
    return on.clamp(0, 1) * alive


def token_distill_mse(state: TokenState, teacher_state: TokenState) -> Tensor:
    """MSE of the student's surviving patch tokens against the dense teacher's tokens at the same original
    positions (both after the final norm); the class token and pruned (masked) tokens are excluded. The
    contract's token MSE (the engine's too), after checking that the teacher is dense."""
    count = state.num_protected
    dense = state.extras.get("dyvm_num_patches", teacher_state.hidden.shape[1] - count) + count
    if teacher_state.hidden.shape[1] != dense or teacher_state.mask is not None:
        raise ValueError(f"dyvm: the distillation teacher must be the dense model ({dense} tokens, no mask); "
                         f"got {teacher_state.hidden.shape[1]} tokens")
    return token_mse(state, teacher_state)


def default_pruning_layers(depth: int) -> list[int]:
    """DyVM prunes before layers 6, 12, 18 of 24: at a quarter, half and three quarters of the depth."""
    return sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3)})


def _check_stages(layers: list[int], ratios: list[float], depth: int) -> None:
    if len(layers) != len(ratios):
        raise ValueError(f"dyvm: {len(layers)} pruning layers but {len(ratios)} token ratios")
    if any(not 1 <= l < depth for l in layers) or layers != sorted(set(layers)):
        raise ValueError(f"dyvm: layers (pruning_layers) must be increasing and in 1..{depth - 1}, got {layers}")
    if any(not 0.0 < r <= 1.0 for r in ratios) or ratios != sorted(ratios, reverse=True):
        raise ValueError(f"dyvm: token ratios must be in (0, 1] and non-increasing, got {ratios}")


# ---------------------------------------------------------------------- public API
def _config_options() -> list[str]:
    return [f.name for f in dataclasses.fields(DyVMConfig) if f.name not in ("keep", "block_ratio", "layers")]


@method_options("dyvm", aliases={"keep_ratio": "keep", "rho": "keep", "pruning_layers": "layers"},
                extra=_config_options)
def apply(model: nn.Module, keep: float | None = 0.7, block_ratio: float | None = 0.8,
          layers: Sequence[int] | None = None, **options: Any) -> nn.Module:
    """Attach DyVM to a Vim model; returns it ready to fine-tune (train mode decides by Gumbel sampling).

    ``keep`` rho (alias ``keep_ratio``): stage s keeps rho**(s+1) of the patch tokens (``None``: no token
    pruning); ``block_ratio``: target fraction of executed scan directions (``None``: no block selection);
    ``layers`` (alias ``pruning_layers``): layers to prune before (default 6, 12, 18 for depth 24). Other
    options: :class:`DyVMConfig`.
    """
    for attr in ("embed_dim", "d_inner", "depth", "set_reducer"):
        if not hasattr(model, attr):
            raise TypeError(f"dyvm.apply needs a VisionMamba model, got {type(model).__name__}")
    ref = next(model.parameters())
    config = DyVMConfig(keep=keep, block_ratio=block_ratio, layers=layers, **options)
    reducer = DyVMReducer(model.embed_dim, model.d_inner, model.depth, config,  # type: ignore[arg-type]
                          protected=int(getattr(model, "num_protected", 1)),
                          paths=int(getattr(model, "num_paths", 2)))
    model.set_reducer(reducer.to(device=ref.device))  # type: ignore[operator]
    return model


def deploy(model: nn.Module) -> nn.Module:
    """Switch to inference: top-k token dropping and per-sample direction skipping (``model.eval()``)."""
    if not isinstance(getattr(model, "reducer", None), DyVMReducer):
        raise ValueError("dyvm.deploy: the model has no DyVM attached (call dyvm.apply first)")
    return model.eval()


def realised_block_ratio(model: nn.Module) -> float | None:
    """Fraction of (layer, direction, sample) scan directions executed in the model's last forward."""
    gates = [m.last_stats.get("gate") for m in model.modules() if hasattr(m, "last_stats")]
    gates = [g for g in gates if g is not None]
    if not gates:
        return None
    return float(torch.stack([g.float().mean() for g in gates]).mean())


def count_flops(model: nn.Module, img_size: int | None = None, block_ratio: float | None = None,
                **options: Any) -> Any:
    """The project's FLOPs report of a DyVM model (inference: real per-stage token counts).

    ``block_ratio=None`` counts the scan directions the selectors actually ran on the counted images (pass
    ``images=`` for real ones); a number counts every layer at that executed-direction fraction instead, e.g.
    the nominal 0.8 of the paper's Vim-S figure, for a reproducible figure from an untrained model.
    """
    from ..analysis.flops import count_flops as count  # noqa: PLC0415 (analysis imports the models)

    report = count(model, img_size=img_size, **options)
    if block_ratio is not None:
        if not 0.0 <= block_ratio <= 1.0:
            raise ValueError(f"dyvm.count_flops: block_ratio must be in [0, 1], got {block_ratio}")
        for layer in report.layers:
            layer.directions = (float(block_ratio),) * len(layer.directions)
    return report


# ---------------------------------------------------------------------- released checkpoints
_OFFICIAL_PREDICTOR = "score_predictors."
_OFFICIAL_SELECTOR = ".mixer.block_head."


@register_key_mapper
def map_official_dyvm_keys(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename the released DyVM names (``score_predictors.S.*``, ``layers.I.mixer.block_head.*``) onto ours
    (``reducer.predictors.S.*``, ``reducer.selectors.I.*``). Leaves other checkpoints untouched."""
    if not any(k.startswith(_OFFICIAL_PREDICTOR) or _OFFICIAL_SELECTOR in k for k in sd):
        return sd
    if not isinstance(getattr(model, "reducer", None), DyVMReducer):
        raise CheckpointMismatchError(
            "this is a DyVM checkpoint (it has score_predictors / block_head weights): attach DyVM to the model "
            "first, e.g. mambatrim.reduce.dyvm.apply(model, keep=0.7, block_ratio=0.8)")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith(_OFFICIAL_PREDICTOR):
            key = "reducer.predictors." + key[len(_OFFICIAL_PREDICTOR):]
        elif _OFFICIAL_SELECTOR in key and key.startswith("layers."):
            layer, rest = key[len("layers."):].split(_OFFICIAL_SELECTOR, 1)
            key = f"reducer.selectors.{layer}.{rest}"
        out[key] = value
    return out


register_method(MethodSpec(
    name="dyvm",
    apply=apply,
    description="DyVM: learned token pruning with rearrangement + dynamic scan-direction selection",
    demo_options={"keep": 0.7, "block_ratio": 0.8, "layers": [2]},
    trainable=True,
    learned=True,
))
