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
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import Tensor, nn

from ..contract import TokenState
from ..validation import check_choice
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
        check_choice(model_type, "model_type", MODEL_TYPES)
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


# ---------------------------------------------------------------------------------------------- video models
class TubeletEmbed(nn.Module):
    """Conv3d patchify of clips (B, C, T, H, W), kernel = stride = (k, p, p), to tokens (B, T/k * H/p * W/p, D)
    ordered time outer, then raster: token ``t*h*w + i*w + j`` is frame t, patch row i, column j."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, kernel_size: int = 1, in_chans: int = 3,
                 embed_dim: int = 192, num_frames: int = 8) -> None:
        super().__init__()
        if kernel_size < 1 or num_frames % kernel_size:
            raise ValueError(f"num_frames={num_frames} must be a multiple of the tubelet length "
                             f"kernel_size={kernel_size} (>= 1)")
        self.img_size, self.patch_size, self.tubelet_size, self.in_chans = img_size, patch_size, kernel_size, in_chans
        self.num_frames = num_frames
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.frame_patches = self.grid_size[0] * self.grid_size[1]
        self.num_patches = num_frames // kernel_size * self.frame_patches  # tokens per clip: what methods count
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(kernel_size, patch_size, patch_size),
                              stride=(kernel_size, patch_size, patch_size))

    def macs(self, args: tuple, output: tuple[Tensor, tuple[int, int, int]]) -> float:
        """MACs per clip of the tubelet projection (for the FLOPs counter)."""
        t, h, w = output[1]
        return float(t * h * w * self.proj.out_channels * self.proj.in_channels * math.prod(self.proj.kernel_size))

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        if x.dim() != 5:
            raise ValueError(f"expected clips of shape (batch, channels, frames, height, width), got "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"the model takes {self.in_chans}-channel clips, got {x.shape[1]} channels "
                             f"(input shape {tuple(x.shape)})")
        k, p = self.tubelet_size, self.patch_size
        bad = [(name, v, m) for name, v, m in (("frames", x.shape[2], k), ("height", x.shape[3], p),
                                               ("width", x.shape[4], p)) if v < m or v % m]
        if bad:
            name, value, m = bad[0]
            raise ValueError(f"clip {name} {value} is not a multiple of the tubelet's {m} (input {tuple(x.shape)})")
        out = self.proj(x)  # (B, D, T', H', W')
        return out.flatten(2).transpose(1, 2), tuple(out.shape[2:])  # type: ignore[return-value]


def resize_temporal_embed(temporal: Tensor, frames: int) -> Tensor:
    """(1, T, D) -> (1, frames, D) by linear interpolation (align_corners False), as the official fine-tuning
    code resizes a checkpoint's temporal embedding."""
    if temporal.shape[1] == frames:
        return temporal
    return F.interpolate(temporal.transpose(1, 2), size=frames, mode="linear",
                         align_corners=False).transpose(1, 2)


def inflate_patch_weight(weight: Tensor, frames: int) -> Tensor:
    """An image model's Conv2d patch weight (D, C, p, p) as a Conv3d one (D, C, frames, p, p): zeros except the
    centre frame (the official ``inflate_weight(center=True)``), so a static clip embeds like the image."""
    out = weight.new_zeros(weight.shape[0], weight.shape[1], frames, *weight.shape[2:])
    out[:, :, frames // 2] = weight
    return out


class VideoMambaVideo(VideoMamba):
    """VideoMamba video classifier (official ``video_sm``): input (B, C, T, H, W); a Conv3d tubelet embedding;
    the spatial ``pos_embed`` added to every frame's patches (the class token gets ``pos_embed[0]``); frame t's
    ``temporal_pos_embedding[t]`` added to its patches, not to the class token; tokens ``[cls, frame 0 raster,
    frame 1 raster, ...]``; mixer, summed directions and head on token 0 as in the image model."""

    def __init__(self, num_frames: int = 8, kernel_size: int = 1, fc_drop_rate: float = 0.0,
                 use_checkpoint: bool = False, checkpoint_num: int = 0, **kwargs: Any) -> None:
        if use_checkpoint or checkpoint_num:
            raise ValueError("VideoMamba video: use_checkpoint / checkpoint_num (activation checkpointing) are not "
                             "supported; leave them at False / 0")
        patch = kwargs.get("patch_size", 16)
        if kwargs.setdefault("stride", patch) != patch:
            raise ValueError(f"VideoMamba video: the tubelet stride is the patch size ({patch}), got "
                             f"stride={kwargs['stride']}")
        super().__init__(**kwargs)
        pe = self.patch_embed
        self.patch_embed = TubeletEmbed(pe.img_size, pe.patch_size, kernel_size, pe.in_chans, self.embed_dim,
                                        num_frames)
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, num_frames // kernel_size, self.embed_dim))
        self.head_drop = nn.Dropout(fc_drop_rate) if fc_drop_rate > 0 else nn.Identity()
        self.num_frames = num_frames

    @property
    def input_size(self) -> tuple[int, int, int, int]:
        pe = self.patch_embed
        return (pe.in_chans, self.num_frames, pe.img_size, pe.img_size)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "temporal_pos_embedding"}

    def adapt_checkpoint(self, sd: dict[str, Tensor], report: Any) -> dict[str, Tensor]:
        """The official fine-tuning loader's adaptations: ``pos_embed`` resampled to this grid (bicubic),
        ``temporal_pos_embedding`` to these frames (linear); an image checkpoint's Conv2d patch weight inflated
        (centre frame) and its missing temporal embedding started at zero."""
        sd = super().adapt_checkpoint(sd, report)
        frames = self.temporal_pos_embedding.shape[1]
        temporal = sd.get("temporal_pos_embedding")
        if temporal is None and sd.get("patch_embed.proj.weight", torch.empty(0)).dim() == 4:
            sd["temporal_pos_embedding"] = torch.zeros_like(self.temporal_pos_embedding)
            report.resized.append("temporal_pos_embedding: absent from the image checkpoint, zeros")
        elif temporal is not None and temporal.dim() == 3 and temporal.shape[1] != frames:
            sd["temporal_pos_embedding"] = resize_temporal_embed(temporal, frames)
            report.resized.append(f"temporal_pos_embedding {tuple(temporal.shape)} -> "
                                  f"{tuple(sd['temporal_pos_embedding'].shape)}")
        weight = sd.get("patch_embed.proj.weight")
        if weight is not None and weight.dim() == 4:
            sd["patch_embed.proj.weight"] = inflate_patch_weight(weight, self.patch_embed.tubelet_size)
            report.resized.append(f"patch_embed.proj.weight {tuple(weight.shape)} -> "
                                  f"{tuple(sd['patch_embed.proj.weight'].shape)} (inflated, centre frame)")
        return sd

    def embed(self, x: Tensor) -> TokenState:
        """Tubelet tokens + per-frame spatial and per-frame temporal embeddings, class token first."""
        tokens, grid = self.patch_embed(x)
        frames, height, width = grid
        bsz, _, dim = tokens.shape
        pos = self.pos_embed
        if pos.shape[1] != height * width + 1:
            pos = resize_prefix_pos_embed(pos, (height, width), self.patch_embed.grid_size, prefix=1)
        temporal = resize_temporal_embed(self.temporal_pos_embedding, frames)
        patches = tokens.view(bsz, frames, height * width, dim) + pos[:, None, 1:] + temporal[:, :, None]
        cls = (self.cls_token + pos[:, :1]).to(patches.dtype).expand(bsz, -1, -1)
        seq = self.pos_drop(torch.cat([cls, patches.flatten(1, 2)], 1))
        positions = torch.arange(seq.shape[1], device=x.device).expand(bsz, -1)
        protected = torch.zeros((bsz, 1), dtype=torch.long, device=x.device)  # the class token, first
        return TokenState(hidden=seq, residual=None, positions=positions, protected=protected, grid=grid,
                          protected_layout="first")

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return features if pre_logits else self.head(self.head_drop(features))
