"""One comparison harness: the dense model and reduction-method configurations timed in ONE process.

Why one process and interleaved rounds: a speed-up is a ratio of two throughputs, and clock, thermal and
co-tenant drift between two separate runs is larger than many of the effects measured. Every round times every
(mode, configuration) once (:func:`~mambatrim.engine.benchmark.interleaved_times_ms`), so drift hits all alike;
a row reports the median over rounds and the spread of its per-round speed-ups over dense. On a GPU the
default mode replays each configuration's whole forward from a CUDA graph (launch overhead removed: eager Vim
is host-bound at moderate batches); ``eager`` times plain launches.

A configuration is a name, a method with its options (``mambatrim.reduce.apply_method``), fast-path policy
settings applied only while that configuration runs (``policy.override``), and for DyVM a selector policy
(:mod:`mambatrim.engine.dyvm_selectors`; DyVM runs deployed, ``dyvm.deploy``). Every configuration starts
from a copy of the same dense weights (random: the work per image of these methods does not depend on them).
FLOPs are the project's counter (:func:`mambatrim.analysis.count_flops`) run on the benchmark images, so
per-image decisions (DyVM's selectors) count as they were taken.
"""
from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..analysis import count_flops
from ..analysis.flops import example_input
from ..models import create_model
from ..ops import policy
from ..reduce import apply_method, dyvm, method_spec
from ..validation import check_choice
from .benchmark import DTYPES, interleaved_times_ms, resolve_device, run_environment
from .cuda_graph import capture_graph
from .dyvm_selectors import set_selector_policy
from .precision import autocast_to

MODES = ("cuda_graph", "eager")
CONFIG_KEYS = ("name", "method", "options", "policy", "selectors", "model")
PLAN_KEYS = ("model", "model_kwargs", "img_size", "batch_size", "dtype", "device", "modes", "rounds", "iters",
             "warmup", "stem", "title", "configs")
DENSE = "dense"


@dataclass(frozen=True)
class Configuration:
    """One row of a comparison: ``method`` None is the dense model (under ``policy``, if any)."""

    name: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    selectors: str | None = None  # DyVM: 'static', 'per_image' or a direction-shares JSON file
    model: str | None = None  # another backbone than the plan's (same img_size and model_kwargs), e.g. MambaReg-S


def configuration(entry: Mapping[str, Any]) -> Configuration:
    """A configuration from a YAML/CLI mapping; unknown keys, policy settings or misplaced selectors raise."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"a configuration is a mapping with keys {', '.join(CONFIG_KEYS)}; got {entry!r}")
    unknown = sorted(set(entry) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"configuration {entry.get('name', '?')!r}: unknown key(s) {', '.join(unknown)}; "
                         f"valid keys: {', '.join(CONFIG_KEYS)}")
    method = entry.get("method")
    if method is not None:
        method_spec(method)  # an unknown name: one line naming the known ones
    name = str(entry.get("name") or _default_name(method, entry.get("options") or {}, entry.get("policy") or {}))
    for key in ("options", "policy"):
        if not isinstance(entry.get(key) or {}, Mapping):
            raise ValueError(f"configuration {name!r}: {key} must be a mapping of name: value")
    cfg = Configuration(name, method, dict(entry.get("options") or {}), dict(entry.get("policy") or {}),
                        entry.get("selectors"), entry.get("model"))
    policy.validate(**cfg.policy)
    if cfg.selectors is not None and cfg.method != "dyvm":
        raise ValueError(f"configuration {name!r}: selectors apply to method dyvm only")
    if cfg.options and cfg.method is None:
        raise ValueError(f"configuration {name!r}: options given without a method")
    return cfg


def _default_name(method: str | None, options: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    words = [method or DENSE] + [f"{k}={v}" for k, v in {**options, **settings}.items()]
    return " ".join(words)


def load_plan(path: str | Path) -> dict[str, Any]:
    """A YAML comparison plan: run settings (``PLAN_KEYS``) and ``configs``, a list of configurations."""
    from .config import load_yaml

    plan = load_yaml(path)
    unknown = sorted(set(plan) - set(PLAN_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(PLAN_KEYS)}")
    if not isinstance(plan.get("configs"), list) or not plan["configs"]:
        raise ValueError(f"{path}: 'configs' must be a non-empty list of configurations")
    plan["configs"] = [configuration(entry) for entry in plan["configs"]]
    return plan


def build_variant(dense: nn.Module, cfg: Configuration, images: torch.Tensor,
                  amp_dtype: torch.dtype | None) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``dense`` with ``cfg``'s method attached (DyVM deployed, its selectors set); returns it with
    what the set-up chose (e.g. the scan directions a static policy switched off)."""
    model = copy.deepcopy(dense)
    if cfg.method is None:
        return model.eval(), {}
    model = apply_method(model, cfg.method, **cfg.options)  # a misspelt option: one line naming the valid ones
    if cfg.method != "dyvm":
        return model.eval(), {}
    model = dyvm.deploy(model)
    if cfg.selectors is None:
        return model, {}
    with policy.override(**cfg.policy):
        chosen = set_selector_policy(model, cfg.selectors, cfg.options.get("block_ratio", 0.8), images, amp_dtype)
    return model, chosen


def _amp(device: torch.device, amp_dtype: torch.dtype | None):
    return autocast_to(device, amp_dtype, cache_enabled=False)


def _forward(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None,
             settings: Mapping[str, Any]) -> Callable[[], None]:
    def forward() -> None:
        with policy.override(**settings), torch.no_grad(), _amp(images.device, amp_dtype):
            model(images)
    return forward


def _flops(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None,
           settings: Mapping[str, Any]) -> dict[str, Any]:
    """GFLOPs of the configuration's forward on the benchmark images (the precision it is timed in)."""
    with policy.override(**settings), _amp(images.device, amp_dtype):
        report = count_flops(model, images=images)
    directions = [sum(layer.directions) / 2 for layer in report.layers]
    return {"gflops": {c: report.gflops(c) for c in ("paper", "full")}, "tokens_per_layer": report.tokens_per_layer,
            "executed_directions": sum(directions) / len(directions)}


def _runners(models: Mapping[str, nn.Module], configs: Mapping[str, Configuration], images: torch.Tensor,
             amp_dtype: torch.dtype | None, modes: list[str]) -> tuple[dict[tuple[str, str], Callable], dict]:
    """(mode, name) -> the timed call; configurations that cannot be captured are reported, not timed."""
    runners: dict[tuple[str, str], Callable[[], object]] = {}
    not_captured: dict[str, str] = {}
    for mode in modes:
        for name, model in models.items():
            forward = _forward(model, images, amp_dtype, configs[name].policy)
            if mode == "eager":
                runners[(mode, name)] = forward
                continue
            try:
                with policy.override(**configs[name].policy):
                    runners[(mode, name)] = capture_graph(forward)
            except RuntimeError as err:  # a forward that synchronises with the host
                not_captured[name] = str(err).splitlines()[0]
    return runners, not_captured


def check_run(batch_size: int, rounds: int, iters: int, warmup: int, modes: list[str],
              device: torch.device) -> None:
    if batch_size < 1 or rounds < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, rounds >= 1, iters >= 1, warmup >= 0 "
                         f"(got {batch_size}, {rounds}, {iters}, {warmup})")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {bad or modes}; choose from {', '.join(MODES)}")
    if "cuda_graph" in modes and device.type != "cuda":
        raise ValueError("mode cuda_graph needs a CUDA device (use mode eager on a CPU)")


def compare(model_name: str, configs: list[Configuration], *, img_size: int = 224, batch_size: int = 128,
            dtype: str = "bf16", device: str | torch.device | None = None, modes: list[str] | None = None,
            rounds: int = 5, iters: int = 10, warmup: int = 10, model_kwargs: Mapping[str, Any] | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time dense + ``configs`` of ``model_name`` in interleaved rounds; returns a JSON-ready result.

    A configuration named ``dense`` without a method is added first unless given. ``modes`` default:
    ``cuda_graph`` on a GPU, ``eager`` on a CPU. Speed-ups are against the dense row of the same mode."""
    dev = resolve_device(device)
    modes = list(modes or (["cuda_graph"] if dev.type == "cuda" else ["eager"]))
    check_run(batch_size, rounds, iters, warmup, modes, dev)
    check_choice(dtype, "dtype", DTYPES)
    amp_dtype = DTYPES[dtype]
    if not any(c.name == DENSE and c.method is None for c in configs):
        configs = [Configuration(DENSE), *configs]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    say = log or (lambda text: None)

    torch.manual_seed(0)
    dense = create_model(model_name, img_size=img_size, **dict(model_kwargs or {})).to(dev).eval()
    images = example_input(dense, img_size, batch_size)  # (B, C, [T,] H, W): a video model's clips keep its frames
    models, setups = {}, {}
    bases = {model_name: dense}
    for cfg in configs:  # every configuration built before any output: a bad one stops the run at once
        other = cfg.model or model_name
        if other not in bases:
            bases[other] = create_model(other, img_size=img_size, **dict(model_kwargs or {})).to(dev).eval()
        models[cfg.name], setups[cfg.name] = build_variant(bases[other], cfg, images, amp_dtype)
    rows, not_captured = time_models(models, configs, images, amp_dtype=amp_dtype, modes=modes, rounds=rounds,
                                     iters=iters, warmup=warmup, setups=setups, log=say)
    return dict(benchmark="compare", model=model_name, model_kwargs=dict(model_kwargs or {}), img_size=img_size,
                batch_size=batch_size, dtype=dtype, modes=modes, rounds=rounds, iters_per_round=iters,
                warmup=warmup, environment=run_environment(dev),
                configs=[dict(name=c.name, method=c.method, options=c.options, policy=c.policy,
                              selectors=c.selectors, model=c.model or model_name) for c in configs],
                rows=rows, not_captured=not_captured)


def time_models(models: Mapping[str, nn.Module], configs: list[Configuration], images: torch.Tensor, *,
                amp_dtype: torch.dtype | None = None, modes: list[str] | None = None, rounds: int = 5,
                iters: int = 10, warmup: int = 10, setups: Mapping[str, dict[str, Any]] | None = None,
                log: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Time ready models (``models[cfg.name]``, the dense one named ``dense``) on ``images`` in interleaved
    rounds; returns the rows (see :func:`_row`) and the configurations that could not be captured.

    The timing core of :func:`compare`, also for models with trained weights (``mambatrim demo``, where a
    method's work per image depends on them)."""
    say = log or (lambda text: None)
    modes = list(modes or (["cuda_graph"] if images.device.type == "cuda" else ["eager"]))
    check_run(images.shape[0], rounds, iters, warmup, modes, images.device)
    by_name = {c.name: c for c in configs}
    if DENSE not in by_name or set(models) != set(by_name):
        raise ValueError(f"time_models needs one model per configuration and a {DENSE!r} one; got models "
                         f"{sorted(models)} for configurations {sorted(by_name)}")
    flops = {}
    for cfg in configs:
        flops[cfg.name] = _flops(models[cfg.name], images, amp_dtype, cfg.policy)
        say(f"built {cfg.name}: {flops[cfg.name]['gflops']['paper']:.3f} GFLOPs (paper)")
    runners, not_captured = _runners(models, by_name, images, amp_dtype, modes)
    for name, why in not_captured.items():
        say(f"cuda_graph {name}: not capturable ({why})")
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    batch_size = images.shape[0]
    times = interleaved_times_ms(runners, rounds, iters, images.device, log=lambda r, key, ms: say(
        f"round {r + 1} {key[0]:>10} {key[1]}: {batch_size / ms * 1e3:.0f} img/s ({ms:.3f} ms)"))
    rows = [_row(mode, cfg, times, flops, (setups or {}).get(cfg.name, {}), batch_size, not_captured)
            for mode in modes for cfg in configs]
    return rows, not_captured


def _row(mode: str, cfg: Configuration, times: Mapping[tuple[str, str], list[float]],
         flops: Mapping[str, dict[str, Any]], setup: dict[str, Any], batch_size: int,
         not_captured: Mapping[str, str]) -> dict[str, Any]:
    """One (mode, configuration) row: median img/s, speed-up over dense (ratio of medians, and the spread of
    the per-round ratios), FLOPs and speed-up / FLOPs ratio (paper convention)."""
    own, base = times.get((mode, cfg.name)), times.get((mode, DENSE))
    f, f_dense = flops[cfg.name], flops[DENSE]
    row: dict[str, Any] = dict(mode=mode, config=cfg.name, gflops={k: round(v, 4) for k, v in f["gflops"].items()},
                               flops_ratio=round(f_dense["gflops"]["paper"] / f["gflops"]["paper"], 4),
                               tokens_per_layer=f["tokens_per_layer"],
                               executed_directions=round(f["executed_directions"], 4), **setup)
    if own is None or base is None:
        row["not_captured"] = not_captured.get(cfg.name) or not_captured.get(DENSE)
        return row
    median = statistics.median(own)
    speedup = statistics.median(base) / median
    per_round = [b / t for b, t in zip(base, own)]
    row.update(img_per_s=round(batch_size / median * 1e3, 1), median_ms=round(median, 4),
               ms_rounds=[round(t, 4) for t in own], img_per_s_rounds=[round(batch_size / t * 1e3, 1) for t in own], speedup=round(speedup, 4),
               speedup_spread=[round(min(per_round), 4), round(max(per_round), 4)],
               speedup_over_flops_ratio=round(speedup / row["flops_ratio"], 4))
    return row


def to_markdown(result: Mapping[str, Any], title: str | None = None) -> str:
    """The result as a markdown table (one row per mode and configuration) with its provenance."""
    env = result["environment"]
    lines = [f"# {title or 'Speed comparison'}: {result['model']} at {result['img_size']} px, batch "
             f"{result['batch_size']}, {result['dtype']}, {env['device_name']}", "",
             f"Median of {result['rounds']} interleaved rounds x {result['iters_per_round']} forwards (every "
             f"configuration timed once per round); spread: lowest and highest per-round speed-up. Random weights. "
             f"torch {env['torch']}, triton {env['triton']}, scan backend `{env['scan_backend']}`, commit "
             f"{env['git_commit'] or 'unknown'}, {env['date']}.", "",
             "| mode | configuration | img/s | speed-up (spread) | GFLOPs paper / full | FLOPs ratio | "
             "speed-up / FLOPs ratio | executed directions | tokens per stage |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        g = r["gflops"]
        stages = "/".join(str(t) for t in sorted(set(r["tokens_per_layer"]), reverse=True))
        if "speedup" not in r:
            timing = f"not timed: {r.get('not_captured')} | |"
        else:
            lo, hi = r["speedup_spread"]
            timing = f"{r['img_per_s']:.0f} | {r['speedup']:.3f}x ({lo:.3f}-{hi:.3f})"
        ratio = f"{r['speedup_over_flops_ratio']:.3f}" if "speedup" in r else ""
        lines.append(f"| {r['mode']} | {r['config']} | {timing} | {g['paper']:.3f} / {g['full']:.3f} | "
                     f"{r['flops_ratio']:.3f} | {ratio} | {r['executed_directions']:.3f} | {stages} |")
    lines += ["", "Configurations (method options; fast-path settings changed for that row only):", ""]
    for c in result["configs"]:
        extra = [f"options {c['options']}"] if c["options"] else []
        extra += [f"policy {c['policy']}"] if c["policy"] else []
        extra += [f"selectors {c['selectors']}"] if c["selectors"] else []
        model = f"{c['model']} " if c.get("model", result["model"]) != result["model"] else ""
        lines.append(f"- {c['name']}: {model}{c['method'] or 'dense'}" + (f" ({'; '.join(extra)})" if extra else ""))
    return "\n".join(lines) + "\n"
