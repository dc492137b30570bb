"""Shared fixtures: tiny model settings and the official state_dict key/shape lists."""
from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run through the interpreter. The switch must be set before any module
# defining kernels is imported (a test importing them first would leave compiled-mode kernels behind).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# A Vim small enough for CPU tests: 32x32 images -> 4 patches + class token, 2 layers, width 32.
TINY = dict(depth=2, embed_dim=32, num_classes=10, img_size=32, drop_path_rate=0.0)


@pytest.fixture
def tiny_kwargs() -> dict[str, Any]:
    return dict(TINY)


@pytest.fixture(scope="session")
def official_state_dict() -> dict[str, Any]:
    """Official key/shape lists per config (written from the hustvl/Vim code) and parameter counts."""
    return json.loads((FIXTURES / "vim_official_state_dict.json").read_text())
