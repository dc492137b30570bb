"""The fused add + RMSNorm backward kernel against the PyTorch form it replaced, at Vim layer shapes.

The PyTorch form (written out below) recomputes rstd from the saved fp32 residual stream and takes a dozen
full-size fp32 kernels; the kernel does it in one pass. Both get the same saved residual, the same upstream
gradients (bf16 normed output, fp32 residual stream) and return the same three gradients; interleaved rounds
in one process, CUDA-event medians.

    python benchmarks/norm_backward.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import time

import torch

from mambatrim.engine.benchmark import cuda_time
from mambatrim.engine.report import write_result
from mambatrim.ops.triton_norm import add_rms_norm_triton

SHAPES = [("Vim-S 224, batch 128", 128 * 197, 384), ("Vim-S 1024, batch 8", 8 * 4097, 384),
          ("Vim-B 224, batch 64", 64 * 197, 768)]


def pytorch_backward(res: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, dres: torch.Tensor,
                     eps: float = 1e-5) -> tuple[torch.Tensor, ...]:
    """The gradients of (res * rstd * w, res) as PyTorch ops: dx in bf16 and fp32, dw."""
    rstd = torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + eps)
    xhat = res * rstd
    g = dy.float() * weight.float()
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True)) + dres.float()
    return dx.to(dy.dtype), dx, (dy.float() * xhat).sum(0).to(weight.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    for name, n_rows, dim in SHAPES:
        h = torch.randn(n_rows, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        r = torch.randn(n_rows, dim, device="cuda", requires_grad=True)
        w = torch.rand(dim, device="cuda", requires_grad=True)
        gy = torch.randn(n_rows, dim, device="cuda", dtype=torch.bfloat16)
        gr = torch.randn(n_rows, dim, device="cuda")
        y, res = add_rms_norm_triton(h, r, w)
        fused = lambda: torch.autograd.grad([y, res], [h, r, w], [gy, gr], retain_graph=True)  # noqa: E731
        ref = lambda: pytorch_backward(res.detach(), w, gy, gr)  # noqa: E731
        got, want = fused(), ref()
        err = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                  for a, b in zip(got, want))
        times: dict[str, list[float]] = {"fused": [], "pytorch": []}
        for _ in range(args.rounds):
            for key, fn in (("fused", fused), ("pytorch", ref)):
                times[key].append(round(cuda_time(fn, iters=20, warmup=3)["median_ms"] * 1e3, 1))
        rows.append(dict(shape=name, rows=n_rows, dim=dim, fused_us=times["fused"], pytorch_us=times["pytorch"],
                         rel_err=err))
        print(rows[-1], flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    lines = [f"# Add + RMSNorm backward: fused kernel vs PyTorch ops ({result['device']})", "",
             f"torch {result['torch']}; the backward of one norm (input, residual-stream and weight gradients), "
             f"CUDA-event medians of {args.rounds} interleaved rounds (µs).", "",
             "| shape | rows x width | fused µs (rounds) | PyTorch µs (rounds) | speed-up | max rel. diff |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['shape']} | {row['rows']:,} x {row['dim']} | "
                     f"{', '.join(f'{t:,.1f}' for t in row['fused_us'])} | "
                     f"{', '.join(f'{t:,.1f}' for t in row['pytorch_us'])} | "
                     f"{min(row['pytorch_us']) / min(row['fused_us']):.2f}x | {row['rel_err']:.1e} |")
    write_result(args.out, "norm_backward", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
