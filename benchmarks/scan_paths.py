"""The multi-order scan kernel (``scan_paths`` on 'triton') against gather + ``selective_scan`` + scatter.

Two shapes, bf16 activations, fp32 parameters, on one GPU:

* PlainMamba-L1-like layer: batch 64, 384 channels, a 14 x 14 grid (196 tokens), state 16, the four zig-zag
  orders sharing one set of SSM parameters; u read in each order, delta / B / C at raster index t, a per-order
  additive B term, the four outputs summed;
* GroupMamba-T stage-1-like layer: batch 64, a 56 x 56 grid (3136 tokens), 64 channels in four groups of 16,
  state 1, each group in its own raster direction with its own delta / B / C, outputs concatenated by channel.

The baseline is what runs without the kernel: per path, gather the inputs into visiting order, one
``selective_scan`` launch (the Triton single-path kernel), scatter the output back, then sum / concatenate.
Forward (no autograd) and forward + backward (gradients for every input), median of interleaved rounds; the
kernel's output and gradients are checked against the baseline's first. The kernel's forward is also timed at
several channel blocks (policy ``scan_paths_fwd_block_d``).

    PYTHONPATH=src python benchmarks/scan_paths.py --out benchmarks/results

Writes ``scan_paths.{json,md}``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from mambatrim.contract import raster_orders, zigzag_orders  # noqa: E402
from mambatrim.engine.benchmark import device_name, interleaved_times_ms  # noqa: E402
from mambatrim.engine.report import write_result  # noqa: E402
from mambatrim.ops import policy, scan_paths  # noqa: E402
from mambatrim.ops.scan_paths import per_path, scan_paths_gathered  # noqa: E402
from mambatrim.ops.triton_scan import selective_scan_triton  # noqa: E402

SHAPES = {
    "PlainMamba-L1 layer (4 zig-zags, shared params)": dict(bsz=64, width=384, grid=(14, 14), state=16,
                                                            orders=zigzag_orders, layout="plain"),
    "GroupMamba-T stage 1 (4 raster groups, concat)": dict(bsz=64, width=16, grid=(56, 56), state=1,
                                                           orders=raster_orders, layout="group"),
}


def inputs(bsz: int, width: int, grid: tuple[int, int], state: int, orders, layout: str, gen: torch.Generator):
    """(tensors with gradients, keyword arguments) of one layer's scan_paths call."""
    dev, bf = "cuda", torch.bfloat16
    K, L = 4, grid[0] * grid[1]
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    channels = width if layout == "plain" else K * width
    tm = lambda t: t.to(dev, bf).transpose(-1, -2)  # token-major storage, (.., C, L) logical  # noqa: E731
    t = dict(u=tm(r(bsz, L, channels)), delta=tm(r(bsz, L, channels) * 0.5 - 1),
             A=-torch.arange(1, state + 1, dtype=torch.float32).repeat(K, width, 1).to(dev),
             D=torch.ones(K, width, device=dev), delta_bias=torch.zeros(K, width, device=dev))
    if layout == "plain":
        t.update(B=tm(r(bsz, L, state)), C=tm(r(bsz, L, state)), B_add=(r(K, L, state) * 0.02).to(dev))
        kw = dict(u_at="token", bc_at="step", combine="sum")
    else:
        t.update(B=tm(r(K, bsz, L, state)), C=tm(r(K, bsz, L, state)))
        kw = dict(u_at="token", bc_at="token", combine="concat")
    index = torch.stack([o.dense_index(grid, torch.device(dev)) for o in orders()])
    return t, dict(kw, index=index, delta_softplus=True)


def kernel(t: dict, kw: dict) -> torch.Tensor:
    return scan_paths(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["delta_bias"],
                      B_add=t.get("B_add"), backend="triton", **kw)


def baseline(t: dict, kw: dict) -> torch.Tensor:
    """Per path: gather, the single-path Triton scan, scatter; then combine (scan_paths' gather backend)."""
    K, width = t["A"].shape[:2]
    bsz = t["u"].shape[0]
    v = {name: per_path(t[name], K, t[name].shape[-2] if name in ("B", "C") else width, name)
         for name in ("u", "delta", "B", "C")}
    index = kw["index"][:, None].expand(-1, bsz, -1)
    B_add = None if "B_add" not in t else t["B_add"][:, None].expand(-1, bsz, -1, -1)
    return scan_paths_gathered(selective_scan_triton, v["u"], v["delta"], t["A"], v["B"], v["C"], t["D"], None,
                               t["delta_bias"], True, index, kw["u_at"], kw["bc_at"], B_add, None, None,
                               kw["combine"], 1.0)


def with_backward(fn: Callable, t: dict, kw: dict, grad: torch.Tensor) -> Callable[[], object]:
    def step() -> None:
        for x in t.values():
            x.grad = None
        fn(t, kw).backward(grad)
    return step


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def agreement(t: dict, kw: dict, grad: torch.Tensor) -> dict[str, float]:
    """Relative L2 difference kernel vs baseline: output and each gradient."""
    out = {}
    for name, fn in (("kernel", kernel), ("baseline", baseline)):
        for x in t.values():
            x.grad = None
        y = fn(t, kw)
        y.backward(grad)
        out[name] = {"y": y.detach()} | {k: x.grad.clone() for k, x in t.items()}
    return {k: round(rel(out["kernel"][k], out["baseline"][k]), 6) for k in out["kernel"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    rows, checks = [], {}
    for shape, spec in SHAPES.items():
        t, kw = inputs(**spec, gen=gen)
        for x in t.values():
            x.requires_grad_()
        with torch.no_grad():
            y = kernel(t, kw)
        grad = torch.randn(y.shape, generator=gen).to(dev, y.dtype)
        checks[shape] = agreement(t, kw, grad)
        runners: dict[str, Callable[[], object]] = {}
        for name, fn in (("kernel", kernel), ("gather + selective_scan + scatter", baseline)):
            runners[f"{name}|forward"] = lambda fn=fn: fn(t, kw)
            runners[f"{name}|forward + backward"] = with_backward(fn, t, kw, grad)
        default = policy.get("scan_paths_fwd_block_d")
        for bd in args.blocks:
            if bd != default:
                runners[f"kernel, block {bd}|forward"] = lambda bd=bd: kernel(t, kw)

        def switch(key: str) -> None:
            bd = int(key.split("block ")[1].split("|")[0]) if "block " in key else default
            policy.set(scan_paths_fwd_block_d=bd)

        with torch.no_grad():
            fwd = {k: v for k, v in runners.items() if k.endswith("|forward")}
            times = interleaved_times_ms(fwd, args.rounds, args.iters, dev, switch=switch)
        policy.set(scan_paths_fwd_block_d=default)
        times |= interleaved_times_ms({k: v for k, v in runners.items() if not k.endswith("|forward")},
                                      args.rounds, args.iters, dev)
        base = {m: statistics.median(times[f"gather + selective_scan + scatter|{m}"])
                for m in ("forward", "forward + backward")}
        for key, ts in times.items():
            name, mode = key.split("|")
            ms = statistics.median(ts)
            rows.append(dict(shape=shape, run=name, mode=mode, ms=round(ms, 4), speedup=round(base[mode] / ms, 2)))
    result = dict(device=device_name(dev), torch=torch.__version__, rounds=args.rounds, iters=args.iters,
                  shapes={k: {n: (v.__name__ if callable(v) else v) for n, v in s.items()} for k, s in SHAPES.items()},
                  default_block=policy.get("scan_paths_fwd_block_d"), agreement=checks, rows=rows)
    lines = [f"# Multi-order scan kernel vs gather + selective_scan + scatter, bf16, {result['device']}", "",
             f"Median of {args.rounds} interleaved rounds of {args.iters} calls. `speedup`: the baseline's time over "
             f"this row's (same shape and mode). Kernel default channel block {result['default_block']}.", "",
             "| shape | run | mode | ms | speedup |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['run']} | {r['mode']} | {r['ms']:.3f} | {r['speedup']:.2f} |" for r in rows]
    lines += ["", "Kernel vs baseline, relative L2 difference (bf16 inputs; output and each gradient):", ""]
    lines += [f"- {shape}: " + ", ".join(f"{k} {v:.1e}" for k, v in c.items()) for shape, c in checks.items()]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    write_result(args.out, "scan_paths", result, markdown)


if __name__ == "__main__":
    main()
