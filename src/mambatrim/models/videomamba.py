"""VideoMamba image models (OpenGVLab/VideoMamba ``videomamba/image_sm``), loading its checkpoints unchanged.

A Vim-family model: Vim's blocks and bidirectional v2 mixer (separate backward parameters, backward branch on
the flipped sequence) with three differences, all kept here:

* the class token comes FIRST: ``cat(cls, patches) + pos_embed``, so its index is 0 in every layer;
* the two directions are summed, ``out_proj(y_f + flip(y_b))``, not averaged;
* FLOPs: the paper's figures (1.1 / 4.3 / 12.7 / 16.9 G for Ti / S / M / B) are fvcore counts in which the
  fused scan (a custom op) and everything inside it count zero: our 'paper' convention counts the mixers'
  in_proj and out_proj only (``paper_paths = 0``); 'full' counts both scan paths;
* the official initialisation: every Linear weight truncated-normal (std 0.02) and EVERY Linear bias zero,
  ``dt_proj.bias`` included (the Mamba dt initialisation is overwritten), the class token zero, the patch
  conv at PyTorch's default; ``out_proj`` Kaiming-uniform / sqrt(depth) as in Mamba.

The ``*_distill`` configs add the student's ``distill_head`` (RMSNorm -> Linear to the teacher width) of the
official distillation code; ``forward`` still returns logits, :meth:`VideoMamba.forward_distill` also the
normalised per-token features the distillation loss reads.

Embedding is split in two steps so video models can reuse it: ``patch_embed`` (pixels -> tokens and grid) and
:meth:`VideoMamba.embed_tokens` (tokens -> the sequence with the class token and position embedding).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import Tensor, nn

from ..contract import TokenState
from .mamba import RMSNorm
from .vim import VisionMamba

MODEL_TYPES = ("student", "teacher")


def resize_prefix_pos_embed(pos: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None,
                            prefix: int) -> Tensor:
    """Resample a position embedding whose ``prefix`` leading slots are not part of the patch grid (bicubic, no
    antialias: the interpolation of the official resize code); ``old_grid`` None = the square grid."""
    if old_grid is None:
        side = math.isqrt(pos.shape[1] - prefix)
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos
    return resample_abs_pos_embed(pos, list(new_grid), list(old_grid), num_prefix_tokens=prefix,
                                  antialias=False)


def adapt_pos_embed(model: nn.Module, sd: dict[str, Tensor], report: Any, prefix: int) -> dict[str, Tensor]:
    """A checkpoint's ``pos_embed`` made for another grid resampled to ``model``'s (its ``prefix`` leading
    slots kept), recorded in ``report.resized``: the ``adapt_checkpoint`` step of models with leading (or no)
    extra slots."""
    pe, target = sd.get("pos_embed"), model.pos_embed
    if pe is not None and pe.dim() == 3 and pe.shape != target.shape and pe.shape[-1] == target.shape[-1]:
        sd["pos_embed"] = resize_prefix_pos_embed(pe, model.patch_embed.grid_size, None, prefix=prefix)
        report.resized.append(f"pos_embed {tuple(pe.shape)} -> {tuple(sd['pos_embed'].shape)}")
    return sd


class VideoMamba(VisionMamba):
    """VideoMamba image classifier: class token first, summed directions, official init (see module doc)."""

    def __init__(self, bimamba: bool = True, distill: bool = False, teacher_embed_dim: int = 384,
                 model_type: str = "student", **kwargs: Any) -> None:
        if not bimamba:
            raise ValueError("VideoMamba: bimamba=False is not supported; only the released bidirectional "
                             "configuration (bimamba=True) is implemented")
        if not kwargs.get("if_cls_token", True):
            raise ValueError("VideoMamba: if_cls_token=False is not supported; its head reads the class token")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
        kwargs.setdefault("if_divide_out", False)
        if distill:  # the official distillation class uses timm's PatchEmbed: stride = patch size
            kwargs["stride"] = kwargs.get("patch_size", 16)
        super().__init__(**kwargs)
        for layer in self.layers:  # the paper's fvcore count sees in_proj / out_proj only (its scan is a custom op)
            layer.mixer.paper_paths = 0
        self.distill = distill and model_type == "student"
        if self.distill:  # the official student's projection to the teacher's width
            self.distill_head = nn.Sequential(RMSNorm(self.embed_dim, eps=self.norm_f.eps),
                                              nn.Linear(self.embed_dim, teacher_embed_dim))
            trunc_normal_(self.distill_head[1].weight, std=0.02)
            nn.init.zeros_(self.distill_head[1].bias)

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The official init (segm_init_weights on every module, then Mamba's out_proj rescaling)."""
        self.patch_embed.proj.reset_parameters()
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.cls_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:  # dt_proj.bias included, as in the official code
                    nn.init.zeros_(module.bias)
        for layer in self.layers:
            out_proj = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out_proj, a=math.sqrt(5))
            out_proj /= math.sqrt(self.depth)

    def adapt_checkpoint(self, sd: dict[str, Tensor], report: Any) -> dict[str, Tensor]:
        """Resample a checkpoint's ``pos_embed`` made for another grid (the leading class slot kept)."""
        return adapt_pos_embed(self, sd, report, prefix=1)

    def embed(self, x: Tensor) -> TokenState:
        tokens, grid = self.patch_embed(x)
        return self.embed_tokens(tokens, grid)

    def embed_tokens(self, tokens: Tensor, grid: tuple[int, int]) -> TokenState:
        """Patch tokens (B, M, D) -> ``cat(cls, tokens) + pos_embed`` (resampled for another grid)."""
        bsz = tokens.shape[0]
        pos = self.pos_embed
        if pos.shape[1] != tokens.shape[1] + 1:
            pos = resize_prefix_pos_embed(pos, grid, self.patch_embed.grid_size, prefix=1)
        cls = self.cls_token.to(tokens.dtype).expand(bsz, -1, -1)
        seq = self.pos_drop(torch.cat([cls, tokens], 1) + pos)
        positions = torch.arange(seq.shape[1], device=tokens.device).expand(bsz, -1)
        protected = torch.zeros((bsz, 1), dtype=torch.long, device=tokens.device)  # the class token stays first
        return TokenState(hidden=seq, residual=None, positions=positions, protected=protected,
                          protected_layout="first")

    def forward_distill(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, unit-norm per-token features): the official distillation forward (student: through
        ``distill_head``; otherwise the final tokens themselves)."""
        state = self.forward_tokens(x)
        hidden = state.hidden
        feats = self.distill_head(hidden) if self.distill else hidden
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return self.forward_head(self.pool(state)), feats
