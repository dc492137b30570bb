"""Semantic segmentation: a registered backbone, a ViT-style multi-level neck and a UperNet head.

The head is our own, after mmseg's ``UPerHead`` (a pyramid pooling module on the coarsest level, an FPN top-down
path, every level upsampled and fused) with the neck of the official Vim segmentation backbone (BEiT style:
the plain 1/16 features of four blocks become 1/4, 1/8, 1/16 and 1/32 maps by two transposed convolutions, one,
none and a max-pool). No maintained pip package fits: mmseg needs mmcv, which does not build against current
PyTorch, and segmentation_models_pytorch's UperNet takes only its own hierarchical encoders.

Token reduction stays the backbone's reducer (``mambatrim.reduce.apply_method(model.backbone, ...)``); every
forward wraps it in :class:`~mambatrim.contract.dense.DenseRestore`, which gives each pruned or merged token its
feature back at the taps, so the head always sees a dense map.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import TokenState
from ..contract.dense import DENSE_TAPS, DenseRestore, protected_positions
from .registry import create_model

POOL_SCALES = (1, 2, 3, 6)
AUX_LOGITS = "aux_logits"  # TokenState.extras key of the auxiliary head's logits (training only)


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """mmseg's ConvModule: conv (no bias) + BatchNorm + ReLU, 'same' padding."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class MultiLevelNeck(nn.Module):
    """Four plain feature maps at stride s -> strides s/4, s/2, s, 2s (deconv x2, deconv, identity, max-pool)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                          nn.ConvTranspose2d(dim, dim, 2, 2)),
            nn.ConvTranspose2d(dim, dim, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.levels):
            raise ValueError(f"the neck takes {len(self.levels)} feature maps, got {len(features)}")
        return [level(f) for level, f in zip(self.levels, features)]


class UPerHead(nn.Module):
    """UperNet decode head: PPM on the last level, FPN over all, fused at the finest level -> class logits."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, dropout: float = 0.1,
                 pool_scales: Sequence[int] = POOL_SCALES) -> None:
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels[-1], channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        last = inputs[-1]
        pooled = [_resize(p(last), last.shape[2:]) for p in self.ppm]
        laterals = [conv(x) for conv, x in zip(self.lateral, inputs)] + [self.bottleneck(torch.cat([last, *pooled], 1))]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """mmseg's auxiliary FCN head (one 3x3 conv): a training-only loss on the third level (weight 0.4)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(in_channels, channels, 3), nn.Dropout2d(dropout),
                                  nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationModel(nn.Module):
    """Backbone features after ``out_indices`` -> neck -> UperNet -> logits at the input resolution."""

    def __init__(self, backbone: nn.Module, num_classes: int, out_indices: Sequence[int] = (5, 11, 17, 23),
                 channels: int | None = None, aux_channels: int = 256) -> None:
        super().__init__()
        depth = int(backbone.depth)
        bad = [i for i in out_indices if not 0 <= int(i) < depth]
        if len(out_indices) != 4 or bad or list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"out_indices must be 4 increasing block indices in 0..{depth - 1}, got "
                             f"{list(out_indices)}")
        self.backbone, self.num_classes = backbone, num_classes
        self.out_indices = tuple(int(i) for i in out_indices)
        dim = int(backbone.embed_dim)
        self.neck = MultiLevelNeck(dim)
        self.decode_head = UPerHead([dim] * 4, channels or dim, num_classes)
        self.auxiliary_head = FCNHead(dim, aux_channels, num_classes) if aux_channels else None
        self.last_state: TokenState | None = None

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    def forward_backbone(self, x: Tensor) -> tuple[list[Tensor], TokenState]:
        """(B, D, h, w) maps after each of ``out_indices`` (pruned / merged tokens restored) and the final state."""
        wrapper = DenseRestore(self.backbone.reducer, self.out_indices, self.backbone.depth)
        state = self.backbone.forward_tokens(x, wrapper)
        h, w = self.backbone.patch_embed.grid_for(x.shape[2], x.shape[3])
        maps = [_patch_map(f, state, h, w) for f in state.extras[DENSE_TAPS]]
        return maps, state

    def forward_head(self, maps: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        return _resize(self.decode_head(self.neck(maps)), size)

    def forward_with_state(self, x: Tensor) -> tuple[Tensor, TokenState]:
        """Logits (B, num_classes, H, W) and the backbone's final token state (for the method's losses); in
        training the auxiliary head's logits ride along in ``state.extras[AUX_LOGITS]``."""
        maps, state = self.forward_backbone(x)
        logits = self.forward_head(maps, x.shape[2:])
        if self.training and self.auxiliary_head is not None:
            state.extras[AUX_LOGITS] = _resize(self.auxiliary_head(maps[2]), x.shape[2:])
        return logits, state

    def forward(self, x: Tensor) -> Tensor:
        """Logits; the final token state stays in ``last_state`` for the method's losses (a DDP-wrapped model
        returns only what ``forward`` returns)."""
        logits, self.last_state = self.forward_with_state(x)
        return logits


def _patch_map(dense: Tensor, state: TokenState, h: int, w: int) -> Tensor:
    """(B, L0, D) dense-sequence features -> (B, D, h, w) patch map (class tokens, if any, left out)."""
    bsz, length, dim = dense.shape
    if length != h * w:  # the patch positions in order (a stable sort, not a boolean index: no host sync)
        keep = torch.ones(bsz, length, device=dense.device).scatter(1, protected_positions(state), 0.0)
        patches = keep.argsort(dim=1, descending=True, stable=True)[:, :h * w]
        dense = dense.gather(1, patches[..., None].expand(-1, -1, dim))
    return dense.transpose(1, 2).reshape(bsz, dim, h, w)


def create_segmentation_model(backbone_name: str, num_classes: int = 150, img_size: int = 512,
                              out_indices: Sequence[int] = (5, 11, 17, 23), channels: int | None = None,
                              class_token: bool = False, aux_channels: int = 256,
                              **backbone_kwargs: Any) -> SegmentationModel:
    """A UperNet segmenter on registered backbone ``backbone_name`` (built at ``img_size``, no classifier).

    ``forward(images (B, 3, H, W)) -> logits (B, num_classes, H, W)``. ``channels``: the UperNet width (the
    backbone's width by default, as the Vim recipes); ``aux_channels``: the auxiliary FCN head's width (0: none).
    The backbone is built without a class
    token (``if_cls_token=False``, as the authors' segmentation backbones) unless ``class_token``; a class
    token, where kept, is left out of the feature maps."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    kwargs = {"num_classes": 0, "img_size": img_size, **backbone_kwargs}
    if not class_token:
        kwargs["if_cls_token"] = False
    backbone = create_model(backbone_name, **kwargs)
    if not hasattr(backbone, "forward_tokens") or not hasattr(backbone, "depth"):
        raise ValueError(f"backbone {backbone_name!r} exposes no per-layer token features (forward_tokens); "
                         "choose a Vim-family model")
    return SegmentationModel(backbone, num_classes, out_indices, channels, aux_channels)
