"""Selective scan and causal conv: one public API, several backends.

:func:`scan_paths` runs K scans whose paths visit the tokens in their own orders (through an index).

Backends:
    ``ref``    sequential over L, fp32 state: the ground truth (slow).
    ``torch``  chunked, pure PyTorch, differentiable: the CPU default.
    ``triton`` fused GPU kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``), when triton imports.

The default backend is chosen per call from the input's device; the ``backend`` setting of
:mod:`mambatrim.ops.policy` (``use_backend`` / ``set_backend`` here, or ``MAMBATRIM_BACKEND``) overrides it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..validation import check_choice

from . import policy
from .conv import causal_conv1d
from .scan_ref import selective_scan_ref
from .scan_paths import scan_paths
from .scan_torch import selective_scan_torch

__all__ = [
    "selective_scan",
    "scan_paths",
    "causal_conv1d",
    "available_backends",
    "set_backend",
    "get_backend",
    "use_backend",
    "BACKENDS",
    "policy",
]

BACKENDS = ("ref", "torch", "triton")


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_scan() -> Callable[..., Tensor]:
    try:
        from .triton_scan import selective_scan_triton  # noqa: PLC0415 (optional, heavy import)
    except ImportError as err:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "the 'triton' scan backend is not available on this machine "
            f"({err}); install the GPU extra (pip install 'mambatrim[gpu]') or use backend='torch'"
        ) from err
    return selective_scan_triton


def available_backends() -> dict[str, str]:
    """Map each backend to a short status string ('ok' or why not)."""
    import torch

    status = {"ref": "ok", "torch": "ok"}
    if not _triton_importable():
        status["triton"] = "triton is not installed"
    elif importlib.util.find_spec("mambatrim.ops.triton_scan") is None:
        status["triton"] = "kernels not built into this version"
    elif torch.cuda.is_available():
        status["triton"] = "ok"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        status["triton"] = "ok (interpreter, CPU: slow)"
    else:
        status["triton"] = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return status


def _check_name(name: str) -> str:
    return check_choice(name, "scan backend", BACKENDS)


def set_backend(name: str | None) -> None:
    """Force a backend for every later call (``None`` restores automatic choice)."""
    policy.set(backend="auto" if name is None else _check_name(name))


def get_backend(device_type: str = "cpu") -> str:
    """The backend a call on ``device_type`` would use now."""
    chosen = policy.get("backend")
    if chosen != "auto":
        return chosen
    if device_type == "cuda" and available_backends().get("triton") == "ok":
        return "triton"
    return "torch"


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Temporarily force a backend: ``with use_backend('ref'): model(x)``."""
    with policy.override(backend="auto" if name is None else _check_name(name)):
        yield


def _validate(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D, z, delta_bias, gap) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, length), got shape {tuple(u.shape)}")
    bsz, dim, length = u.shape
    expect = {
        "delta": (delta, (bsz, dim, length)),
        "A": (A, (dim, A.shape[-1] if A.dim() == 2 else -1)),
        "B": (B, (bsz, A.shape[-1] if A.dim() == 2 else -1, length)),
        "C": (C, (bsz, A.shape[-1] if A.dim() == 2 else -1, length)),
        "D": (D, (dim,)),
        "z": (z, (bsz, dim, length)),
        "delta_bias": (delta_bias, (dim,)),
        "gap": (gap, (bsz, length)),
    }
    for name, (tensor, shape) in expect.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"selective_scan: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                f"for u of shape {tuple(u.shape)} (A must be (dim, d_state); B, C (batch, d_state, length))"
            )


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    gap: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Mamba-1 selective scan ``y = scan(u; delta, A, B, C) + D*u``, gated by ``silu(z)``.

    Args:
        u, delta, z: (batch, dim, length). B, C: (batch, d_state, length). A: (dim, d_state). D, delta_bias: (dim,).
        delta_softplus: apply ``softplus(delta + delta_bias)`` (Mamba's discretisation step).
        reverse: scan right-to-left (Vim's backward direction) without flipping the inputs.
        gap: (batch, length) pruned positions before each step in scan order: the state also decays across them
            (pruning-aware alignment). ``None`` = contiguous sequence.
        backend: 'ref' | 'torch' | 'triton'; default from :func:`get_backend`.
    Returns:
        y with u's shape and dtype; the state is kept in fp32 whatever the input dtype.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, gap)
    if u.is_meta:  # shape inference only (e.g. counting FLOPs of a model built on the meta device)
        return torch.empty_like(u)
    name = _check_name(backend) if backend is not None else get_backend(u.device.type)
    fn = {"ref": selective_scan_ref, "torch": selective_scan_torch}.get(name) or _triton_scan()
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              reverse=reverse, gap=gap)
