"""Host time of the Triton launch path: how long the host spends issuing one fused pair-scan call (no
synchronisation: the GPU runs behind), with the launch code's integer helpers (``mambatrim.ops.intmath``)
against Triton's ``cdiv`` / ``next_power_of_2`` (constexpr functions in recent Triton), interleaved rounds in
one process; and an eager Vim-S forward's host time against its synchronised wall time.

    python benchmarks/launch_host.py --out benchmarks/results
    python benchmarks/launch_host.py --stub --out benchmarks/results   # no GPU: the wrapper's own Python

Eager inference at small batch waits on the host (the GPU finishes each launch before the next is issued), so
host time per call is what this measures; a CUDA graph removes it altogether. ``--stub`` runs without a GPU: the
Triton kernels are replaced by launches that do nothing and the inputs are small CPU tensors, so only the
wrapper's own Python (argument checks, launch plan, strides, buffers) is timed, not Triton's launcher.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from resolution_sweep import build, pair_inputs  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn: Callable[[], object], n: int) -> float:
    """Median host microseconds of ``n`` calls of ``fn`` issued back to back (launches queued: the GPU is
    synchronised before and after, not in between), after one untimed call."""
    from mambatrim.engine.benchmark import host_times_ms

    fn()
    _sync()
    t = statistics.median(host_times_ms(fn, n)) * 1e3
    _sync()
    return t


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def stub_kernels() -> None:
    """Replace the scan module's kernels by :class:`_NoLaunch` and let it take CPU tensors (``--stub``)."""
    from mambatrim.ops import triton_scan

    for name in dir(triton_scan):
        if name.startswith("_") and name.endswith("_kernel"):
            setattr(triton_scan, name, _NoLaunch())
    triton_scan._check_device = lambda *tensors: None


def cpu_pair_inputs(bsz: int, dim: int, length: int, n: int = 16, dt_rank: int = 24) -> list:
    """Small CPU tensors in the fused mixer's layouts (as :func:`resolution_sweep.pair_inputs`), for ``--stub``."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tm = lambda *s: r(2, bsz, length, s[-1]).permute(0, 1, 3, 2).bfloat16()  # noqa: E731
    proj = r(2, bsz, length, dt_rank + 2 * n).bfloat16()
    return [tm(dim), tm(dim), -torch.rand(2, dim, n, generator=g), proj[..., dt_rank:dt_rank + n].permute(0, 1, 3, 2),
            proj[..., dt_rank + n:].permute(0, 1, 3, 2), r(2, dim), r(bsz, length, dim).transpose(1, 2).bfloat16(),
            r(2, dim)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", help="result name (default launch_host, with --stub launch_host_stub)")
    ap.add_argument("--stub", action="store_true", help="no GPU: time the wrapper's Python with no-op kernels")
    args = ap.parse_args(argv)
    if not args.stub and not torch.cuda.is_available():
        ap.error("needs a CUDA device (host time of GPU launches), or --stub for the wrapper's Python alone")
    import triton

    from mambatrim.engine.benchmark import device_name
    from mambatrim.ops import intmath, triton_scan, use_backend

    if args.stub:
        stub_kernels()
    device = torch.device("cpu" if args.stub else "cuda")
    stem = args.name or ("launch_host_stub" if args.stub else "launch_host")
    out: dict = {"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
                 "rounds": args.rounds, "stub": args.stub}
    out["helper_us"] = {
        "triton.cdiv": timeit.timeit(lambda: triton.cdiv(1000, 7), number=20000) / 20000 * 1e6,
        "intmath.cdiv": timeit.timeit(lambda: intmath.cdiv(1000, 7), number=20000) / 20000 * 1e6}
    helpers = {"triton": (triton.cdiv, triton.next_power_of_2), "intmath": (intmath.cdiv, intmath.next_power_of_2)}
    rows = []
    with torch.no_grad():
        shapes = ((2, 64, 16),) if args.stub else ((8, 768, 197), (128, 768, 197), (8, 768, 4097))
        for bsz, dim, length in shapes:
            ins = (cpu_pair_inputs(bsz, dim, length) if args.stub
                   else pair_inputs(bsz, dim, length, 16, torch.bfloat16, dt_rank=24))
            fn = lambda: triton_scan.selective_scan_pair_triton(*ins[:8])  # noqa: E731
            times: dict[str, list[float]] = {k: [] for k in helpers}
            for _ in range(args.rounds):
                for name, (cdiv, np2) in helpers.items():
                    triton_scan.cdiv, triton_scan.next_power_of_2 = cdiv, np2
                    times[name].append(host_us(fn, 1000 if args.stub else 200))
            triton_scan.cdiv, triton_scan.next_power_of_2 = helpers["intmath"]
            for name, t in times.items():
                what = f"pair scan {bsz} x {dim} x {length}" + (" (kernels stubbed)" if args.stub else "")
                rows.append({"what": what, "helpers": name, "host_us": t, "median": statistics.median(t)})
                print(rows[-1], flush=True)
            ins = None
        for img, bsz in () if args.stub else ((224, 8), (224, 128)):
            model = build("vim_small", img).cuda().eval()
            images = torch.randn(bsz, 3, img, img, device="cuda")

            def fwd() -> None:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    model(images)
            with use_backend("triton"):
                host = [host_us(fwd, 10) for _ in range(args.rounds)]
                wall = []
                for _ in range(args.rounds):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(10):
                        fwd()
                    torch.cuda.synchronize()
                    wall.append((time.perf_counter() - t0) / 10 * 1e6)
            rows.append({"what": f"Vim-S eager forward {img} px batch {bsz}", "helpers": "intmath", "host_us": host,
                         "median": statistics.median(host), "wall_us": wall, "wall_median": statistics.median(wall)})
            print(rows[-1], flush=True)
            model = images = None
            torch.cuda.empty_cache()
    out["rows"] = rows
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{stem}.json").write_text(json.dumps(out, indent=1))
    title = "the scan wrapper's Python, kernels stubbed" if args.stub else "Triton launches"
    lines = [f"# Host time of {title} ({out['device']})", "",
             f"torch {out['torch']}, triton {out['triton']}; {args.rounds} interleaved rounds in one process. "
             "Host µs: each round the median host time of a call, calls issued back to back without "
             "synchronising. One host call of triton.cdiv: "
             f"{out['helper_us']['triton.cdiv']:.2f} µs, of the plain-integer helper: "
             f"{out['helper_us']['intmath.cdiv']:.2f} µs.", "",
             "| what | launch-code helpers | host µs a call (median) | rounds | synchronised wall µs (median) |",
             "|---|---|---|---|---|"]
    for r in rows:
        wall = f"{r['wall_median']:,.0f}" if "wall_median" in r else "-"
        lines.append(f"| {r['what']} | {r['helpers']} | {r['median']:,.1f} | "
                     f"{', '.join(f'{t:,.0f}' for t in r['host_us'])} | {wall} |")
    (dest / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
