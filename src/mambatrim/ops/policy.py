"""Every fast-path choice in one place: scan backend, fused steps, kernel launch settings.

Modelled on timm's ``layers/config.py``: code reads a setting with :func:`get`; users and benchmarks change
settings with :func:`set` or, for a block of code, ``with policy.override(...)``; each setting also has an
environment override ``MAMBATRIM_<NAME>`` (e.g. ``MAMBATRIM_FUSED_ROW_GATHER=0``,
``MAMBATRIM_BACKEND=torch``), read when this module is imported. Nothing else in the package keeps a
module-level switch, and no code assigns one from outside.

A setting changes only speed (which kernel runs, how it is launched), never the result beyond rounding: every
fused step has a tested PyTorch equivalent.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = ["SETTINGS", "get", "set", "override", "validate", "current", "reset", "describe"]


@dataclass(frozen=True)
class Setting:
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None  # allowed values; without them ints must be >= 1


SETTINGS: dict[str, Setting] = {
    "backend": Setting("auto", "scan / conv backend: 'auto' picks 'triton' on a CUDA device where triton imports, "
                       "else 'torch'", ("auto", "ref", "torch", "triton")),
    "fused_mixer": Setting(True, "the fused mixer executors wherever their plan is supported: on the GPU the "
                           "Triton pair (one conv kernel, batched projections, one scan launch for every scan "
                           "path); on the CPU the compiled paths (dt_proj and the paths' sum inside the scan)"),
    "mixer_in_place": Setting(True, "at inference the fused Vim mixer puts in_proj's output, both directions' "
                              "step sizes and the scan's output in one (b, L, 3E) buffer: the step sizes of the "
                              "first direction over in_proj's x half (dead once the conv has read it), the scan's "
                              "output over them (each read before it is written); two (b, L, E) tensors less at "
                              "the layer's peak (H100, Vim-S forward activations: 495 -> 399 MiB at 1024 px batch "
                              "8, 381 -> 307 at 224 px batch 128; same logits)"),
    "fused_row_gather": Setting(True, "token gathers through the Triton row-copy kernel at inference (+2.6-3.0 % "
                                "on DyVM, dyvm_speed results)"),
    "fused_predictor_norm": Setting(True, "DyVM predictor's add + LayerNorm as one Triton pass at inference"),
    "fused_predictor_head": Setting(True, "DyVM predictor's head as one Triton kernel at inference"),
    "fused_merge": Setting(True, "R-MeeTo's merge as fused Triton kernels at inference on CUDA"),
    "merge_single_max_tokens": Setting(513, "R-MeeTo's fused merge plans sequences up to this many tokens in one "
                                       "program per image (all A x B similarities in registers; at most 513), "
                                       "longer ones with the tiled plan"),
    "merge_tile": Setting(64, "A tokens per program and B tokens per step of R-MeeTo's tiled similarity (a power "
                          "of two >= 16)"),
    "merge_tile_warps": Setting(4, "warps per program of R-MeeTo's tiled similarity (255 registers a thread at "
                                "the 64 tile with 4 warps, 127 with 8, sm_90 ptxas)"),
    "merge_slot_block": Setting(1024, "tokens per step of R-MeeTo's tiled slot pass, one program per image (a "
                                "power of two)"),
    "scan_fwd_block_d": Setting(64, "channels per program of the forward scan (H100 sweep)"),
    "scan_fwd_warps": Setting(1, "warps per program of the forward scan"),
    "scan_fwd_tile": Setting(4, "forward scan schedule: T > 0 takes T steps at a time, one thread holding all "
                             "states of a channel (H100: T 4 with 3 stages 1.13-1.20x the step walk in Vim-S); 0 "
                             "walks the sequence one step at a time (a warp holds scan_fwd_block_d channels, 4 "
                             "states a thread)", choices=(0, 2, 4, 8)),
    "scan_fwd_tile_warps": Setting(1, "warps per program of the tiled forward scan (32 channels each)"),
    "scan_fwd_tile_stages": Setting(3, "software-pipelining stages of the tiled forward scan's loop over tiles "
                                    "(1: none; more prefetch the next tiles' loads asynchronously)"),
    "scan_fwd_tile_split_below": Setting(2, "the tiled forward's scan_seq_split_below (32 channels a program: "
                                               "twice the step walk's programs; H100, 768 channels: batch 16 at "
                                               "2,305 tokens, 2.9 programs per SM, is 1.12x faster unsplit, batch 8 "
                                               "at 577-4,097 tokens, 1.5 per SM, 1.1-1.7x faster split)"),
    "scan_fwd_bc_fp32": Setting(True, "the tiled forward reads 16-bit B and C from fp32 copies made once per call "
                                      "(otherwise each thread converts every value of its tile: H100, Vim-S 1.02-"
                                      "1.06x; the step walk loses from them and never uses them)"),
    "scan_fwd_prefetch": Setting(32, "the tiled forward prefetches the rows of its 16-bit inputs (u, step sizes, z, "
                                 "the accumulated output) into L2 this many steps ahead (0: off), in launches of "
                                 "fewer than scan_fwd_prefetch_below programs per multiprocessor (H100, Vim-S "
                                 "batch 8: 1.01-1.02x at 768-1024 px; the scan kernel 1.01-1.02x at 577-4,097 "
                                 "positions, 0.99x at 16 x 768 x 2,305)", choices=(0, 8, 16, 32, 64)),
    "scan_fwd_prefetch_below": Setting(20, "programs per multiprocessor below which scan_fwd_prefetch applies (H100: "
                                       "on for the sequence split's 16-17 per SM; 0.98-0.99x at 23 per SM, Vim-S's "
                                       "layer at 224 px batch 128, where it stays off)"),
    "scan_pair_split_below": Setting(4, "the fused pair's forward runs its two directions as separate programs "
                                     "(the second writing its own output, added after) where one program per "
                                     "channel block and sample would run fewer than this many programs per "
                                     "multiprocessor (0: never; H100, 768 channels, batch 8: 1.14-1.20x at 197-577 "
                                     "positions, batch 16 at 2,305: 1.09-1.14x)", choices=(0, 1, 2, 3, 4, 6, 8, 16)),
    "scan_pair_split_max_len": Setting(2048, "where the pair pass would split the sequence instead, the directions "
                                       "run as separate programs only up to this many positions (H100, batch 8: "
                                       "0.88-1.06x at 4,097, 1.02x at 2,305, 1.00-1.09x at 1,025)"),
    "scan_bwd_block_d": Setting(32, "channels per program of the backward scan"),
    "scan_bwd_warps": Setting(1, "warps per program of the backward scan"),
    "scan_bwd_tile": Setting(2, "backward scan schedule: T > 0 takes T steps at a time (in-thread scans of the "
                             "states and their gradients, dB / dC summed once a tile; T must divide "
                             "scan_ckpt_chunk; with position gaps the step walk runs); 0 walks one step at a time "
                             "(H100, forward + backward of the pair: T 2 1.38x the step walk at 128 x 768 x 197, "
                             "1.3x at 8 x 768 x 4,097 split; T 4 spills registers)",
                             choices=(0, 2, 4, 8)),
    "scan_ckpt_chunk": Setting(8, "scan steps per stored state (training forward) and per backward chunk"),
    "scan_seq_split": Setting("auto", "split the scan along the sequence (chunk states, then outputs from the "
                              "carried states): 'auto' where a single pass would leave the GPU idle, 'on' "
                              "always (tests), 'off' never", ("auto", "on", "off")),
    "scan_seq_chunk": Setting(64, "positions per sequence chunk under scan_seq_split='on'; the shortest chunk "
                              "under 'auto'"),
    "scan_seq_split_below": Setting(4, "scan_seq_split='auto' splits a scan whose single pass runs fewer "
                                    "programs than this per multiprocessor (H100: batch 64 at 768 channels, 5.8 "
                                    "per SM, is faster unsplit; batch 8, 0.7 per SM, 3.9x faster split)"),
    "scan_seq_programs": Setting(16, "a split forward scan runs chunks enough for this many programs per "
                                 "multiprocessor (H100 sweep, resolution_sweep scan section)"),
    "scan_bwd_seq_programs": Setting(32, "the same for the split backward"),
    "scan_paths_fwd_block_d": Setting(32, "channels per program of the multi-order scan's forward (scan_paths; "
                                      "narrower than the single scan's: one program walks every summed path, so "
                                      "more programs fill the GPU)"),
    "scan_paths_bwd_block_d": Setting(32, "channels per program of the multi-order scan's backward"),
    "conv_block_l": Setting(16, "tokens per program of the pair conv"),
    "conv_block_e": Setting(128, "channels per program of the pair conv"),
    "conv_warps": Setting(4, "warps per program of the pair conv"),
    "conv_bwd_block_e": Setting(64, "channels per program of the pair conv's backward"),
    "conv_bwd_warps": Setting(1, "warps per program of the pair conv's backward"),
    "conv_bwd_segments": Setting(4, "sequence segments per sample of the pair conv's backward"),
    "table_lookup_grad": Setting("onehot", "backward of a small table's rows picked by many labels (PlainMamba's "
                                 "direction terms): 'onehot' sums each row's gradient as one matrix product, "
                                 "'index' is PyTorch's indexing backward (one thread adds a label's duplicates "
                                 "in sequence)", ("onehot", "index")),
    "cpu_kernels": Setting("auto", "scan and conv of the torch backend at CPU inference: 'compiled' (cpu_kernels.c "
                           "built with the system C compiler, cached), 'torch' (PyTorch ops); 'auto' = compiled "
                           "where a C compiler builds it, else torch", ("auto", "compiled", "torch")),
}

_values: dict[str, Any] = {}


def _check(name: str, value: Any) -> Any:
    if name not in SETTINGS:
        raise ValueError(f"unknown fast-path setting {name!r}; valid settings: {', '.join(SETTINGS)}")
    spec = SETTINGS[name]
    kind = type(spec.default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"setting {name!r} takes True or False, got {value!r}")
    elif kind is int and spec.choices is None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"setting {name!r} takes a positive integer, got {value!r}")
    elif spec.choices is not None and (value not in spec.choices or isinstance(value, bool)):
        raise ValueError(f"setting {name!r} must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
    return value


def _parse(name: str, text: str) -> Any:
    kind = type(SETTINGS[name].default)
    if kind is bool:
        low = text.strip().lower()
        if low not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
            raise ValueError(f"environment variable MAMBATRIM_{name.upper()}={text!r}: expected 1/0 or true/false")
        return low in ("1", "true", "on", "yes")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"environment variable MAMBATRIM_{name.upper()}={text!r}: expected an integer") from None
    return text.strip()


def _from_environment() -> dict[str, Any]:
    found = {}
    for name in SETTINGS:
        text = os.environ.get(f"MAMBATRIM_{name.upper()}")
        if name == "backend" and not text:
            text = os.environ.get("MAMBATRIM_SCAN_BACKEND")  # the older name
        if text:
            found[name] = _check(name, _parse(name, text))
    return found


def reset() -> None:
    """Defaults, then the environment overrides."""
    _values.clear()
    _values.update({name: spec.default for name, spec in SETTINGS.items()})
    _values.update(_from_environment())


def get(name: str) -> Any:
    """The current value of setting ``name``."""
    try:
        return _values[name]
    except KeyError:
        _check(name, None)  # raises with the valid names
        raise


def validate(**values: Any) -> dict[str, Any]:
    """``values`` checked (names and values) without applying them; a bad one is a one-line ValueError."""
    return {name: _check(name, value) for name, value in values.items()}


def set(**values: Any) -> None:  # noqa: A001 (the timm-style name)
    """Change settings for the rest of the process: ``policy.set(fused_row_gather=False)``."""
    _values.update(validate(**values))


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Change settings inside a block: ``with policy.override(backend='torch'): model(x)``."""
    checked = validate(**values)
    saved = {name: _values[name] for name in checked}
    _values.update(checked)
    try:
        yield
    finally:
        _values.update(saved)


def current() -> dict[str, Any]:
    """A copy of every setting (recorded in benchmark results)."""
    return dict(_values)


def describe() -> str:
    """One line per setting: name, value, what it does."""
    return "\n".join(f"{name} = {_values[name]!r}: {spec.doc}" for name, spec in SETTINGS.items())


reset()
