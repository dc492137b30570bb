"""The one throughput loop: images/s of a model, inference or training step, on CPU or GPU.

Protocol (recorded in the result): random input made once outside the timed loop, ``warmup`` untimed
iterations (covering autotuning and lazy initialisation), then ``iters`` timed iterations, each timed on its
own (CUDA events on a GPU, ``perf_counter`` on a CPU); the reported throughput is batch / median iteration
time. Mixed precision uses autocast; the model's weights stay fp32. A training iteration is
forward + cross-entropy + backward + AdamW step.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
import statistics
import subprocess
import time
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import get_backend, policy
from .precision import DTYPES, autocast as _autocast

K = TypeVar("K", bound=Hashable)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/'auto' -> cuda when available, else cpu; refuses a CUDA device that is not there."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available here (use --device cpu)")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    """The package source's git commit (``+dirty`` with uncommitted changes); None outside a checkout."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise OSError(done.stderr)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_environment(device: torch.device) -> dict[str, Any]:
    """Where and with what a measurement ran: device, library versions, commit, date, fast-path settings."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return dict(device=str(device), device_name=device_name(device), torch=torch.__version__, triton=triton,
                python=platform.python_version(), scan_backend=get_backend(device.type), git_commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                policy=policy.current())


def mean_time_ms(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Mean ms per call of ``fn`` over ``iters`` back-to-back calls (one pair of CUDA events around the loop on a
    GPU, the host clock on a CPU). For interleaved comparisons; :func:`measure_throughput` times each call."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / iters


def host_times_ms(fn: Callable[[], object], iters: int) -> list[float]:
    """ms of each of ``iters`` calls of ``fn`` on the host clock (CPU work; a GPU needs events)."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def best_time_ms(fn: Callable[[], object], iters: int) -> float:
    """Fastest of ``iters`` calls of ``fn`` in ms (host clock). On a shared CPU other processes only ever add
    time to a call, so the fastest call is the one least disturbed: the CPU estimate of interleaved rounds."""
    return min(host_times_ms(fn, iters))


def _event_times_ms(fn: Callable[[], object], iters: int) -> list[float]:
    """ms of each of ``iters`` calls of ``fn`` between two CUDA events (synchronised after each call)."""
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return times


def cuda_time(fn: Callable[[], object], iters: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn`` over ``iters`` timed calls (CUDA events), after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = _event_times_ms(fn, iters)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": iters}


def graph_time(fn: Callable[[], object], calls: int = 10, replays: int = 10,
               warmup: int = 3) -> dict[str, float]:
    """Median / min / max milliseconds a call of ``fn`` keeps the GPU busy: ``calls`` calls captured in one CUDA
    graph, each of ``replays`` replays timed with CUDA events and divided by ``calls``.

    :func:`cuda_time` brackets one eager call with events, so the GPU's wait for the host between the call's
    launches (argument checks, allocations, Triton's launcher) counts too: for the fused scan of a Vim-S layer
    that wait was more than half of the figure (H100, ``scan_graph_timed.md``). Replayed from a graph the
    launches cost no host time, as in a graphed model. ``fn`` must be capturable (no host synchronisation)."""
    from .cuda_graph import capture_graph

    replay = capture_graph(lambda: [fn() for _ in range(calls)], warmup)
    replay()
    torch.cuda.synchronize()
    times = [t / calls for t in _event_times_ms(replay, replays)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "calls": calls,
            "replays": replays}


def interleaved_times_ms(runners: Mapping[K, Callable[[], object]], rounds: int, iters: int, device: torch.device,
                         switch: Callable[[K], None] | None = None,
                         log: Callable[[int, K, float], None] | None = None) -> dict[K, list[float]]:
    """ms per call of every runner, in ``rounds`` interleaved rounds (every runner once per round, so clock and
    thermal drift hit all alike): per runner and round the :func:`mean_time_ms` of ``iters`` calls on a GPU, the
    :func:`best_time_ms` of ``iters`` calls on a CPU (where load from other processes would otherwise decide).

    Before each timing: ``switch(key)`` (e.g. attach that configuration's reducer to a shared model) and one
    untimed call. ``log(round, key, ms)`` after each timing. Returns each runner's per-round times."""
    times: dict[K, list[float]] = {key: [] for key in runners}
    for r in range(rounds):
        for key, fn in runners.items():
            if switch is not None:
                switch(key)
            fn()
            ms = mean_time_ms(fn, iters, device) if device.type == "cuda" else best_time_ms(fn, iters)
            times[key].append(ms)
            if log is not None:
                log(r, key, ms)
    return times


def measure_throughput(
    model: nn.Module,
    batch_size: int = 64,
    img_size: int = 224,
    device: str | torch.device | None = None,
    dtype: str = "fp32",
    warmup: int = 10,
    iters: int = 30,
    train: bool = False,
    cuda_graph: bool = False,
) -> dict[str, Any]:
    """Benchmark ``model`` on random images; returns a JSON-ready dict (img_per_s = batch / median time).

    ``model`` is moved to ``device``; its train/eval mode is restored afterwards. Training runs a real AdamW
    step, so the weights change: benchmark a copy if they matter. ``cuda_graph`` times inference replayed
    from a captured CUDA graph (:class:`mambatrim.engine.cuda_graph.GraphedForward`).
    """
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, iters >= 1, warmup >= 0 (got {batch_size}, {iters}, {warmup})")
    device = resolve_device(device)
    _autocast(device, dtype)  # refuse an unknown dtype before any work
    if cuda_graph and (train or device.type != "cuda"):
        raise ValueError("cuda_graph applies to inference on a CUDA device only")
    in_chans = getattr(getattr(model, "patch_embed", None), "in_chans", 3)
    model.to(device)
    was_training = model.training
    model.train(train)
    shape = list(getattr(model, "input_size", None) or (in_chans, img_size, img_size))  # (C, [T,] H, W)
    shape[-2:] = [img_size, img_size]
    images = torch.randn(batch_size, *shape, device=device)
    optimizer = scaler = targets = None
    if train:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
        num_classes = getattr(model, "num_classes", 0) or 1
        targets = torch.randint(0, num_classes, (batch_size,), device=device)

    cuda = device.type == "cuda"
    if cuda:  # the peak covers warm-up and graph capture: a graph's memory is allocated while it is captured
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    graphed = None
    if cuda_graph:
        from .cuda_graph import GraphedForward

        graphed = GraphedForward(model, images, DTYPES[dtype])

    def step() -> None:
        if graphed is not None:
            graphed(images)
            return
        if not train:
            with torch.no_grad(), _autocast(device, dtype):
                model(images)
            return
        with _autocast(device, dtype):
            outs = model(images)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)  # (head, dist_head): both trained
            loss = sum(F.cross_entropy(out.float(), targets) if out.dim() == 2 and out.shape[1] > 1
                       else out.float().mean() for out in outs)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    try:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        if cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
            for start, end in events:
                start.record()
                step()
                end.record()
            torch.cuda.synchronize(device)
            times_ms = [start.elapsed_time(end) for start, end in events]
        else:
            times_ms = host_times_ms(step, iters)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    finally:
        model.train(was_training)
    median = statistics.median(times_ms)
    return {
        "img_per_s": batch_size / (median / 1e3),
        "median_ms": median,
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "times_ms": times_ms,
        "batch_size": batch_size,
        "img_size": img_size,
        "dtype": dtype,
        "mode": "train" if train else ("inference, CUDA graph" if cuda_graph else "inference"),
        "warmup": warmup,
        "iters": iters,
        "device": str(device),
        "device_name": device_name(device),
        "scan_backend": get_backend(device.type),
        "peak_mem_mib": peak,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
