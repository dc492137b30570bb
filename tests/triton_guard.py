"""The shared preamble of the Triton kernel tests: import it before anything that imports the kernels.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before the kernels are
imported); a module importing this is skipped where Triton is missing, or where there is neither CUDA nor the
interpreter. ``DEVICE`` is where its tensors go: the GPU for compiled kernels, else the CPU.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
