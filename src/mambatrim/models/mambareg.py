"""MambaReg ("Vision Mamba Needs Registers", wangf3014/Mamba-Reg), loading its checkpoints unchanged.

A Vim-family model: Vim's blocks and bidirectional v2 mixer with ``(y_f + y_b) / 2``; what differs is the
token layout and the head.

* No class token: ``n`` registers ``cls_token`` (1, n, D) with their own ``pos_embed_cls`` (1, n, D);
  ``pos_embed`` (1, M, D) covers the patches only.
* Register layout: with ``L = M // (n + 1)``, register g sits at index ``L + g * (L + 1)``, after its group of
  L patches; leftover patches come last (224 px, 12 registers: [15, 31, ..., 191], 208 tokens).
* Head: the normalised registers at their positions, register-major. ``cls_reduce`` 1: flattened to n*D;
  otherwise a bias-free ``neck`` Linear D -> D/r per register, flattened, ONE RMSNorm (``norm_neck``) over the
  n*D/r values, then ``head``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ..contract import TokenState, take_rows
from .mamba import RMSNorm
from .videomamba import adapt_pos_embed, resize_prefix_pos_embed
from .vim import VisionMamba


@lru_cache(maxsize=None)
def register_layout(num_patches: int, num_registers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(order, register positions): ``order[i]`` is the row of ``cat(patches, registers)`` at sequence index i
    (patch p -> p, register g -> num_patches + g); register g sits at ``L + g * (L + 1)``."""
    group = num_patches // (num_registers + 1)
    order: list[int] = []
    for g in range(num_registers):
        order += list(range(g * group, (g + 1) * group)) + [num_patches + g]
    order += list(range(num_registers * group, num_patches))
    return tuple(order), tuple(group + g * (group + 1) for g in range(num_registers))


class MambaReg(VisionMamba):
    """MambaReg classifier (see module doc). ``forward_features`` -> the head's input (n*D/r values)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, depth: int = 24, embed_dim: int = 192,
                 num_classes: int = 1000, num_cls_tokens: int = 12, cls_reduce: int = 1, norm_epsilon: float = 1e-5,
                 **kwargs: Any) -> None:
        if num_cls_tokens < 1:
            raise ValueError(f"num_cls_tokens must be at least 1 (the registers the head reads), got {num_cls_tokens}")
        if cls_reduce < 1 or embed_dim % cls_reduce or num_cls_tokens % cls_reduce:
            raise ValueError(f"cls_reduce={cls_reduce} must be a positive divisor of embed_dim ({embed_dim}) and "
                             f"of num_cls_tokens ({num_cls_tokens}): the official head needs both")
        kwargs.pop("stride", None)  # the official patch embedding has none: stride = patch size
        super().__init__(img_size=img_size, patch_size=patch_size, stride=patch_size, depth=depth,
                         embed_dim=embed_dim, num_classes=num_classes, norm_epsilon=norm_epsilon, **kwargs)
        self.num_cls_tokens, self.cls_reduce = num_cls_tokens, cls_reduce
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, num_cls_tokens, embed_dim))
        self.pos_embed_cls = nn.Parameter(torch.zeros(1, num_cls_tokens, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.num_features = embed_dim * num_cls_tokens // cls_reduce
        if cls_reduce > 1:
            self.neck = nn.Linear(embed_dim, embed_dim // cls_reduce, bias=False)
            self.norm_neck = RMSNorm(self.num_features, eps=norm_epsilon)
            trunc_normal_(self.neck.weight, std=0.02)
        self.reset_classifier(num_classes)
        for p in (self.cls_token, self.pos_embed_cls, self.pos_embed):
            trunc_normal_(p, std=0.02)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @property
    def num_protected(self) -> int:
        """The registers: no method prunes or merges them."""
        return self.num_cls_tokens

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "pos_embed_cls"}

    def adapt_checkpoint(self, sd: dict[str, Tensor], report: Any) -> dict[str, Tensor]:
        """Resample a checkpoint's patch-only ``pos_embed`` made for another grid; ``pos_embed_cls`` belongs to
        the registers, not the grid, and is kept as it is."""
        return adapt_pos_embed(self, sd, report, prefix=0)

    def layout(self, num_patches: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(order, register positions) as tensors on ``device`` (see :func:`register_layout`), made once per
        patch count and device: no host-to-device copy per forward, so the forward can be captured in a CUDA
        graph."""
        key = (num_patches, str(device))
        cache = self.__dict__.setdefault("_layouts", {})
        if key not in cache:
            order, registers = register_layout(num_patches, self.num_cls_tokens)
            cache[key] = (torch.tensor(order, device=device), torch.tensor(registers, device=device))
        return cache[key]

    def embed(self, x: Tensor) -> TokenState:
        """Patches + pos_embed and registers + pos_embed_cls, interleaved by the register layout."""
        tokens, grid = self.patch_embed(x)
        bsz, m, _ = tokens.shape
        pos = self.pos_embed
        if pos.shape[1] != m:
            pos = resize_prefix_pos_embed(pos, grid, self.patch_embed.grid_size, prefix=0)
        regs = (self.cls_token + self.pos_embed_cls).to(tokens.dtype).expand(bsz, -1, -1)
        order, registers = self.layout(m, x.device)
        seq = self.pos_drop(torch.cat([tokens + pos, regs], 1)[:, order])
        positions = torch.arange(seq.shape[1], device=x.device).expand(bsz, -1)
        # the registers are the protected tokens; a method that rearranges tokens re-spreads them evenly
        return TokenState(hidden=seq, residual=None, positions=positions, protected=registers.expand(bsz, -1),
                          protected_layout="spread")

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_tokens(x))

    def pool(self, state: TokenState) -> Tensor:
        """The head's input from the final token state: the registers where they sit now (register-major),
        flattened, through the neck and its norm where ``cls_reduce`` > 1."""
        regs = take_rows(state.hidden, state.protected)  # (B, n, D)
        if self.cls_reduce > 1:
            return self.norm_neck(self.neck(regs).flatten(1))
        return regs.flatten(1)
