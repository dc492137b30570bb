"""Vision Mamba (Vim) backbones, faithful to hustvl/Vim and loading its checkpoints unchanged.

Bidirectional v2 mixer, class token in the middle of the sequence (index M//2, before the position embedding
is added), RMSNorm with an fp32 residual stream (add -> norm -> mixer), divide-by-2 of the two directions, the
official drop-path schedule. Reduction methods attach through ``model.set_reducer`` (see ``mambatrim.reduce``).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from torch import Tensor, nn

from ..contract import Reducer, TokenState, masked_mean
from .mamba import BiMambaMixer, RMSNorm
from .pos_embed import resize_pos_embed


class PatchEmbed(nn.Module):
    """Conv patchify (kernel ``patch_size``, stride ``stride``) to (B, M, D) tokens in raster order."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, stride: int = 16, in_chans: int = 3,
                 embed_dim: int = 192) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.stride, self.in_chans = img_size, patch_size, stride, in_chans
        self.grid_size = self.grid_for(img_size, img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)
        self.norm = nn.Identity()

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for an input size; a clear error where patches cannot tile the image exactly."""
        p, s = self.patch_size, self.stride
        bad = [v for v in (height, width) if v < p or (v - p) % s]
        if bad:
            ok = p + s * max(0, round((bad[0] - p) / s))
            raise ValueError(
                f"input size {height}x{width} cannot be tiled by {p}x{p} patches at stride {s}: each side must "
                f"be {p} + k*{s} (e.g. {ok} or {ok + s})"
            )
        return ((height - p) // s + 1, (width - p) // s + 1)

    def macs(self, args: tuple, output: tuple[Tensor, tuple[int, int]]) -> float:
        """MACs per image of the patch projection (for the FLOPs counter: the conv may run as a GEMM)."""
        grid = output[1]
        proj = self.proj
        return float(grid[0] * grid[1] * proj.out_channels * proj.in_channels * proj.kernel_size[0]
                     * proj.kernel_size[1])

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (batch, channels, height, width), got {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"the model takes {self.in_chans}-channel images, got {x.shape[1]} channels "
                             f"(input shape {tuple(x.shape)})")
        grid = self.grid_for(x.shape[2], x.shape[3])
        if self.patch_size == self.stride:  # non-overlapping patches: one GEMM
            tokens = self._patchify_matmul(x, grid)
        else:
            tokens = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(tokens), grid

    def _patchify_matmul(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """The conv as (B*M, C*p*p) @ (C*p*p, D): the same weights and result. cuDNN runs this 3-channel, 16x16
        stride-16 conv as an implicit GEMM about 15x slower than the GEMM itself (0.83 ms of a 16 ms Vim-S forward
        at batch 128 on an H100), a fixed cost that token reduction cannot shrink."""
        bsz, chans = x.shape[:2]
        p = self.patch_size
        dev = x.device.type
        dtype = x.dtype
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
        # the patch layout and autocast's cast in one copy (one pass over the image instead of two)
        patches = torch.empty((bsz, grid[0], grid[1], chans, p, p), dtype=dtype, device=x.device)
        patches.copy_(x.reshape(bsz, chans, grid[0], p, grid[1], p).permute(0, 2, 4, 1, 3, 5))
        patches = patches.view(bsz, grid[0] * grid[1], chans * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


def _hooked(modules: nn.Module) -> bool:
    """Whether any forward hook (global, or on ``modules`` or their children) could see a layer's tensors."""
    from torch.nn.modules import module as torch_module  # noqa: PLC0415

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules.modules())


class Block(nn.Module):
    """Add -> RMSNorm -> mixer, carrying an fp32 residual stream (Mamba's fused add-norm, prenorm=True)."""

    def __init__(self, dim: int, mixer: BiMambaMixer, drop_path: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps=eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: Tensor, residual: Tensor | None, ctx: Any = None,
                in_place: bool = False) -> tuple[Tensor, Tensor]:
        """``in_place`` (inference): the caller gives up ``hidden`` and ``residual``; the add-norm may write its
        results over them (see :meth:`RMSNorm.add_and_norm`)."""
        if residual is not None:  # the first block gets the embeddings: no drop path
            hidden = self.drop_path(hidden)
        normed, residual = self.norm.add_and_norm(hidden, residual, in_place=in_place)
        return self.mixer(normed, ctx), residual


class VisionMamba(nn.Module):
    """Vim classifier. ``forward(images) -> logits``; ``forward_features`` -> normalised class token (or the
    mean of the final tokens with ``if_cls_token=False``)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        stride: int = 16,
        depth: int = 24,
        embed_dim: int = 192,
        channels: int = 3,
        num_classes: int = 1000,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_epsilon: float = 1e-5,
        if_divide_out: bool = True,
        if_cls_token: bool = True,
        in_chans: int | None = None,
        if_devide_out: bool | None = None,  # the official (typo) spelling, accepted for compatibility
        **unused: Any,
    ) -> None:
        super().__init__()
        _check_official_kwargs(unused, if_cls_token)
        if if_devide_out is not None:
            if_divide_out = if_devide_out
        channels = in_chans if in_chans is not None else channels
        self.num_classes, self.embed_dim, self.depth = num_classes, embed_dim, depth
        self.num_features = embed_dim
        self.d_state, self.d_conv, self.expand = d_state, d_conv, expand
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, channels, embed_dim)
        num_patches = self.patch_embed.num_patches
        # no class token (the official if_cls_token=False): the head reads the mean of the final tokens
        self.if_cls_token = bool(if_cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if if_cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + int(if_cls_token), embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # linspace(0, drop_path_rate, depth) in Python: no tensor, so models also build on the meta device
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        inter_dpr = [0.0] + dpr  # block i drops the previous mixer's output with dpr[i-1]
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        mixer = partial(BiMambaMixer, d_state=d_state, d_conv=d_conv, expand=expand, divide_out=if_divide_out)
        self.layers = nn.ModuleList(
            Block(embed_dim, mixer(embed_dim), drop_path=inter_dpr[i], eps=norm_epsilon) for i in range(depth)
        )
        self.norm_f = RMSNorm(embed_dim, eps=norm_epsilon)
        self.reducer: Reducer | None = None
        self._init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def _init_weights(self) -> None:
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
        for module in self.modules():  # zero every Linear bias not flagged _no_reinit (upstream _init_weights)
            if isinstance(module, nn.Linear) and module.bias is not None:
                if not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
        for layer in self.layers:
            out_proj = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out_proj, a=math.sqrt(5))
            out_proj /= math.sqrt(self.depth)

    # ------------------------------------------------------------------ properties used by tools
    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.embed_dim / 16)

    @property
    def num_protected(self) -> int:
        """Protected tokens (no method prunes or merges them) every image's sequence starts with: the class
        token, if any. What methods size their schedules with before a forward (``TokenState.protected``)."""
        return int(self.if_cls_token)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.patch_embed.in_chans, self.patch_embed.img_size, self.patch_embed.img_size)

    def adapt_checkpoint(self, sd: dict[str, Tensor], report: Any) -> dict[str, Tensor]:
        """Resample a checkpoint's ``pos_embed`` made for another grid (the middle class token, if any, kept
        apart); called by :func:`~mambatrim.models.load_checkpoint`, which records the change in
        ``report.resized``."""
        pe, target = sd.get("pos_embed"), self.pos_embed
        if pe is not None and pe.shape != target.shape and pe.dim() == 3 and pe.shape[-1] == target.shape[-1]:
            sd["pos_embed"] = resize_pos_embed(pe, self.patch_embed.grid_size, cls_token=self.if_cls_token)
            report.resized.append(f"pos_embed {tuple(pe.shape)} -> {tuple(sd['pos_embed'].shape)}")
        return sd

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def set_reducer(self, reducer: Reducer | None) -> "VisionMamba":
        """Attach a reduction method (or ``None`` to restore the dense model). Returns the model."""
        self.reducer = reducer
        return self

    # ------------------------------------------------------------------ forward
    def embed(self, x: Tensor) -> TokenState:
        """Patch-embed, insert the class token (if any) at the middle, add the (resampled if needed) pos_embed.
        The class token is the one protected token, laid out in the middle; without it none is."""
        tokens, grid = self.patch_embed(x)
        bsz, m, dim = tokens.shape
        pos = self.pos_embed
        if pos.shape[1] != m + int(self.if_cls_token):
            pos = resize_pos_embed(pos, grid, self.patch_embed.grid_size, cls_token=self.if_cls_token)
        if self.cls_token is None:
            seq = self.pos_drop(tokens + pos)
            positions = torch.arange(m, device=x.device).expand(bsz, -1)
            protected = torch.empty((bsz, 0), dtype=torch.long, device=x.device)
            return TokenState(hidden=seq, residual=None, positions=positions, protected=protected,
                              protected_layout="none")
        c = m // 2
        cls = self.cls_token.to(tokens.dtype)
        if torch.is_grad_enabled():
            seq = torch.cat([tokens[:, :c], cls.expand(bsz, -1, -1), tokens[:, c:]], 1) + pos
        else:  # the same sums written in place of the concatenation: one pass over the tokens, not two
            seq = tokens.new_empty((bsz, m + 1, dim), dtype=torch.result_type(tokens, pos))
            torch.add(tokens[:, :c], pos[:, :c], out=seq[:, :c])
            torch.add(tokens[:, c:], pos[:, c + 1:], out=seq[:, c + 1:])
            seq[:, c] = cls[:, 0] + pos[:, c]
        seq = self.pos_drop(seq)
        positions = torch.arange(m + 1, device=x.device).expand(bsz, -1)
        protected = torch.full((bsz, 1), c, dtype=torch.long, device=x.device)
        return TokenState(hidden=seq, residual=None, positions=positions, protected=protected,
                          protected_layout="middle")

    def forward_tokens(self, x: Tensor, reducer: Reducer | None | str = "attached") -> TokenState:
        """Run every block; returns the final state with ``hidden`` = norm_f output of all remaining tokens.

        ``reducer``: the attached one by default; another (e.g. a wrapper around the attached one that records
        per-layer features) or ``None`` for this call only."""
        state = self.embed(x)
        reducer = self.reducer if isinstance(reducer, str) else reducer
        if reducer is not None:
            state = reducer.begin(state)
        # dense inference: nothing but this loop holds a layer's input stream, so the add-norm may overwrite it
        # (a reducer or a hook could keep references to it)
        in_place = reducer is None and not torch.is_grad_enabled() and not _hooked(self.layers)
        for i, layer in enumerate(self.layers):
            ctx = None
            if reducer is not None:
                state = reducer.before_layer(i, state)
                ctx = reducer.mixer_context(i, state)
            hidden, residual = layer(state.hidden, state.residual, ctx, in_place=in_place)
            state = state.replace(hidden=hidden, residual=residual)
        if reducer is not None:
            state = reducer.finish(state)
        hidden = state.hidden if state.residual is None else self.drop_path(state.hidden)  # None: depth 0
        normed, residual = self.norm_f.add_and_norm(hidden, state.residual)
        return state.replace(hidden=normed, residual=residual)

    def pool(self, state: TokenState) -> Tensor:
        """(B, D) the head's input from the final state: the class token (``protected[:, 0]``), or without one
        the mean of the final tokens (the official ``final_pool_type='mean'``; kept tokens only under a mask)."""
        hidden = state.hidden
        if state.num_protected:
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), state.protected[:, 0]]
        return masked_mean(hidden, state.mask)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_tokens(x))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return features if pre_logits else self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# Switches of the official constructor, at the values every released model uses (the only configuration
# implemented here). They are accepted so official build code keeps working; other values are refused.
_OFFICIAL_SWITCHES: dict[str, Any] = {
    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "final_pool_type": "mean",
    "if_abs_pos_embed": True, "if_rope": False, "if_rope_residual": False, "bimamba_type": "v2",
    "use_middle_cls_token": True, "if_bidirectional": False,
    "flip_img_sequences_ratio": -1, "use_double_cls_token": False, "if_bimamba": False,
    "init_layer_scale": None, "ssm_cfg": None, "initializer_cfg": None,
}
_TIMM_PASSTHROUGH = {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}


def _check_official_kwargs(kwargs: dict[str, Any], if_cls_token: bool) -> None:
    for key, value in kwargs.items():
        if key in _TIMM_PASSTHROUGH or (key == "use_middle_cls_token" and not if_cls_token):
            continue
        if key not in _OFFICIAL_SWITCHES:
            raise TypeError(f"VisionMamba got an unknown argument {key!r}")
        if value != _OFFICIAL_SWITCHES[key]:
            raise ValueError(f"VisionMamba: {key}={value!r} is not supported; only the released configuration "
                             f"({key}={_OFFICIAL_SWITCHES[key]!r}) is implemented")
