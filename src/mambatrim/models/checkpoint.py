"""The one checkpoint loader: official Vim files, our own training checkpoints, raw state_dicts.

Loads with ``weights_only=True`` (only ``argparse.Namespace`` is allowed beyond tensors and containers: the
official files pickle their training arguments under ``args``), unwraps ``{'model': ...}`` /
``{'model_ema': ...}`` / ``{'state_dict': ...}``, strips ``module.`` prefixes, resamples ``pos_embed`` for
another grid with the middle class token handled correctly, and refuses mismatched checkpoints with an error
naming the offending keys and shapes.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn



class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (missing, truncated, corrupt, or holding disallowed objects)."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not fit the model."""


KeyMapper = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]
_KEY_MAPPERS: list[KeyMapper] = []


def register_key_mapper(fn: KeyMapper) -> KeyMapper:
    """Register a function that renames foreign parameter names (e.g. a method's released checkpoints)."""
    _KEY_MAPPERS.append(fn)
    return fn


@dataclass
class LoadReport:
    source: str
    entry: str | None
    resized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` with weights_only=True and a clear error for every way a file can be bad."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted write?")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 (garbage bytes raise anything: IndexError, KeyError, ...)
        raise CheckpointError(_unreadable(path, err)) from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights")
    return dict(obj)


def _unreadable(path: Path, err: Exception) -> str:
    """One line for a file ``torch.load`` refused: a real checkpoint holding a type that is not allowed is named
    as such (with the type); anything else is garbage or a truncated file."""
    global_name = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if global_name:
        return (f"checkpoint {path} holds a {global_name.group(1)} object, which is not allowed to be unpickled "
                f"(only tensors, containers and argparse.Namespace are): re-save the weights as a state_dict")
    return f"not a PyTorch checkpoint (or corrupt): {path}"


def extract_state_dict(obj: Mapping[str, Any], use_ema: bool = False) -> tuple[dict[str, Tensor], str | None]:
    """Pick the weights out of a checkpoint dict; returns (state_dict, entry name or None for raw)."""
    order = ("model_ema", "model", "state_dict") if use_ema else ("model", "state_dict", "model_ema")
    entry = next((k for k in order if isinstance(obj.get(k), Mapping)), None)
    if use_ema and entry != "model_ema":
        raise CheckpointError("use_ema=True but the checkpoint has no 'model_ema' entry")
    sd = dict(obj[entry]) if entry else dict(obj)
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint entry {entry or '<root>'} is not a state_dict: non-tensor values "
                              f"under {bad[:5]}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, entry


def _describe_mismatch(missing: list[str], unexpected: list[str], shapes: list[str], limit: int = 12) -> str:
    parts = []
    for title, items in (("shape mismatches", shapes), ("missing from the checkpoint", missing),
                         ("unexpected in the checkpoint", unexpected)):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: " + "; ".join(items[:limit]) + more)
    return "\n  ".join(parts)


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    use_ema: bool = False,
    skip_mismatched_head: bool = False,
    map_location: str | torch.device = "cpu",
) -> LoadReport:
    """Load weights into ``model``.

    Args:
        checkpoint: a file path, a checkpoint dict (``{'model': ...}``, ``{'model_ema': ...}``), or a state_dict.
        strict: refuse missing/unexpected keys (shape mismatches are always refused).
        use_ema: load the ``model_ema`` entry instead of ``model``.
        skip_mismatched_head: leave the classifier at its init when its class count differs (fine-tuning).
    Raises:
        CheckpointError (unreadable), CheckpointMismatchError (keys/shapes that do not fit, all of them named).
    """
    source = "<state_dict>"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        checkpoint = read_checkpoint(checkpoint, map_location)
    sd, entry = extract_state_dict(checkpoint, use_ema=use_ema)
    report = LoadReport(source=source, entry=entry)
    for mapper in _KEY_MAPPERS:
        sd = mapper(sd, model)
    target = model.state_dict()

    adapt = getattr(model, "adapt_checkpoint", None)
    if adapt is not None:  # the model's own checkpoint-side details (position embeddings for another grid, ...)
        sd = adapt(sd, report)
    if skip_mismatched_head:
        for key in [k for k in sd if k.startswith("head.")]:
            if key in target and sd[key].shape != target[key].shape:
                report.skipped.append(f"{key} {tuple(sd.pop(key).shape)}")

    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
              for k, v in sd.items() if k in target and v.shape != target[k].shape]
    missing = [k for k in target if k not in sd and not (skip_mismatched_head and k.startswith("head."))]
    unexpected = [k for k in sd if k not in target]
    if shapes or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(
            f"checkpoint {source} does not fit {type(model).__name__}:\n  "
            + _describe_mismatch(missing, unexpected, shapes))
    model.load_state_dict(sd, strict=False)
    report.missing, report.unexpected = missing, unexpected
    return report
