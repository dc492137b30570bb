"""Vim-Ti against DeiT-Ti forward on the CPU (batch 8, 224, fp32; --img-size for longer sequences), and the scan
backends at Vim-Ti's shapes.

Every variant runs in ONE process, interleaved in rounds (DeiT-Ti, Vim-Ti compiled kernels, Vim-Ti PyTorch
ops, DeiT-Ti, ...) so that clock drift and load from other processes on the shared cores hit all alike; each
variant's images/s is batch / median of all its timed forwards (``measure_throughput``), and the ratio Vim-Ti /
DeiT-Ti is also taken per round (median and range reported). Vim-Ti runs on the ``torch`` backend with the
``cpu_kernels`` setting 'compiled' (cpu_kernels.c; with ``fused_mixer`` on, the default, the CompiledCpuPaths
executor folds dt_proj and the paths' combine into the scan; with it off they run in PyTorch) and 'torch'
(PyTorch ops). A scan-only comparison (one
direction, b=batch, d_inner=384, L=tokens, d_state=16, token-major inputs as the mixer hands them over) times the
compiled scan, the blocked PyTorch scan and the sequential ``ref`` the same way; the compiled kernels' one-off
build time is reported separately. Writes ``NAME.json`` and ``NAME.md`` (``--name``, default ``cpu_forward``)
into ``--out``.

    python benchmarks/cpu_forward.py --out benchmarks/results
    python benchmarks/cpu_forward.py --img-size 512 --batch-size 2 --name cpu_forward_512 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import timm
import torch

import mambatrim  # noqa: F401 (registers the Vim models with timm)
from mambatrim.engine.benchmark import measure_throughput
from mambatrim.engine.report import write_result
from mambatrim.ops import cpu_kernels, policy, selective_scan, use_backend

# variant -> policy settings: the compiled kernels with the fused CPU executor (default), the compiled scan and
# conv with dt_proj and the paths' combine in PyTorch (fused_mixer off), and PyTorch ops only
VIM = {"vim_compiled": dict(cpu_kernels="compiled"),
       "vim_compiled_unfused": dict(cpu_kernels="compiled", fused_mixer=False),
       "vim_pytorch_ops": dict(cpu_kernels="torch")}
SCANS = {"compiled": ("torch", "compiled"), "torch_blocked": ("torch", "torch"), "ref": ("ref", "torch")}


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def forward_rounds(batch: int, img: int, rounds: int, iters: int, warmup: int, slow_iters: int) -> dict:
    models = {"deit": timm.create_model("deit_tiny_patch16_224", img_size=img),
              "vim": timm.create_model("vim_tiny_patch16_224", img_size=img)}
    times: dict[str, list[float]] = {k: [] for k in ("deit", *VIM)}
    ratios: dict[str, list[float]] = {k: [] for k in VIM}
    for _ in range(rounds):
        medians = {}
        for variant in times:
            model = models["deit" if variant == "deit" else "vim"]
            n = slow_iters if variant == "vim_pytorch_ops" else iters
            with use_backend("torch"), policy.override(**VIM.get(variant, {})):
                res = measure_throughput(model, batch, img, "cpu", "fp32", warmup=warmup, iters=n)
            times[variant] += res["times_ms"]
            medians[variant] = statistics.median(res["times_ms"])
        for variant in VIM:
            ratios[variant].append(medians["deit"] / medians[variant])
    out = {k: {"img_per_s": batch / (statistics.median(v) / 1e3), "ms": _spread(v)} for k, v in times.items()}
    for variant in VIM:
        out[variant]["ratio_to_deit_overall"] = out[variant]["img_per_s"] / out["deit"]["img_per_s"]
        out[variant]["ratio_to_deit_per_round"] = _spread(ratios[variant])
    return out


def scan_rounds(batch: int, length: int, rounds: int, iters: int) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(0)
    b, d, n = batch, 384, 16

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    # (b, L, d) memory viewed as (b, d, L): the layout the mixer passes
    u, delta, z = (rand(b, length, d).transpose(1, 2) for _ in range(3))
    B, C = (rand(b, length, n).transpose(1, 2) for _ in range(2))
    A, D, bias = -torch.rand(d, n, generator=gen) * 4, rand(d), rand(d)
    times: dict[str, list[float]] = {k: [] for k in SCANS}
    with torch.no_grad():
        for _ in range(rounds):
            for name, (backend, kernels) in SCANS.items():
                with policy.override(cpu_kernels=kernels):
                    selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)  # warm-up
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)
                        times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "iters": len(v)} for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224, help="image size (tokens: (size / 16)^2 + 1)")
    parser.add_argument("--name", default="cpu_forward", help="file stem of the result")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=4, help="timed forwards per variant per round")
    parser.add_argument("--slow-iters", type=int, default=1, help="timed forwards of Vim-Ti on PyTorch ops per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per variant per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    why = cpu_kernels.unavailable_reason()  # builds the kernels (or finds them cached)
    build_s = time.perf_counter() - t0
    if why:
        raise SystemExit(f"this benchmark compares the compiled CPU kernels, which are unavailable: {why}")
    load_before = os.getloadavg()
    tokens = (args.img_size // 16) ** 2 + 1
    scan = scan_rounds(args.batch_size, tokens, args.rounds, args.iters * 5)
    forward = forward_rounds(args.batch_size, args.img_size, args.rounds, args.iters, args.warmup, args.slow_iters)
    load_after = os.getloadavg()
    result = {
        "models": ["vim_tiny_patch16_224", "deit_tiny_patch16_224"], "img_size": args.img_size, "tokens": tokens,
        "batch_size": args.batch_size,
        "dtype": "fp32", "forward": forward, "scan_one_direction": scan,
        "kernel_build_or_cache_load_s": build_s,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
    }
    f, s = forward, scan
    names = {"deit": "DeiT-Ti", "vim_compiled": "Vim-Ti, compiled CPU kernels",
             "vim_compiled_unfused": "Vim-Ti, compiled scan and conv, dt_proj and combine in PyTorch",
             "vim_pytorch_ops": "Vim-Ti, PyTorch ops (no compiler)"}
    rows = []
    for k, label in names.items():
        ratio = "1" if k == "deit" else (
            f"{f[k]['ratio_to_deit_overall']:.2f} (per round {f[k]['ratio_to_deit_per_round']['median']:.2f}, "
            f"{f[k]['ratio_to_deit_per_round']['min']:.2f}-{f[k]['ratio_to_deit_per_round']['max']:.2f})")
        rows.append(f"| {label} | {f[k]['img_per_s']:.2f} | {f[k]['ms']['median']:.0f} "
                    f"({f[k]['ms']['min']:.0f}-{f[k]['ms']['max']:.0f}) | {f[k]['ms']['n']} | {ratio} |")
    md = [
        f"# Vim-Ti vs DeiT-Ti CPU forward, batch {args.batch_size}, fp32, {args.img_size}x{args.img_size} "
        f"({tokens} tokens; {result['cpu_count']} CPU cores, {result['threads']} threads, torch {result['torch']})",
        "",
        "| model | img/s | median ms (range) | forwards | / DeiT-Ti img/s |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"| one-direction scan ({args.batch_size} x 384 x {tokens} x 16) | median ms |",
        "|---|---|",
        *(f"| {k} | {v['median_ms']:.1f} |" for k, v in s.items()),
        "",
        f"All variants interleaved in {args.rounds} rounds in one process on a machine whose cores other jobs "
        f"share (1-min load average {load_before[0]:.1f} -> {load_after[0]:.1f}): absolute times are noisy, "
        "the ratios are the result. Kernel build (or cache load) "
        f"{build_s:.2f} s, not in the timings.",
        "",
    ]
    write_result(args.out, args.name, result, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
