"""DyVM's keep predictor on one GPU: the fused Triton head against the PyTorch head, per launch setting.

Times a whole predictor call (add + LayerNorm, first linear + GELU, the global pooling, the head) on DyVM-Vim-S's
three pruning stages (batch 128; 197, 138 and 97 tokens; width 384), each replayed from a CUDA graph, in
interleaved rounds: the PyTorch head (``reduce.dyvm.FUSED_PREDICTOR_HEAD`` off) and the fused kernel at several
(rows per program, warps, pipeline stages, K and H2 steps) settings. Reports the median ms per forward (the
three stages together), the fused/PyTorch ratio and how far the log-probabilities are from the PyTorch head's.

    python benchmarks/keep_head.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch

from mambatrim.engine.benchmark import interleaved_times_ms
from mambatrim.engine.cuda_graph import capture_graph
from mambatrim.engine.report import write_result
from mambatrim.ops import triton_head, use_backend
from mambatrim.reduce import dyvm

# (rows per program, warps, pipeline stages, K step, H2 step)
SETTINGS = [(64, 4, 2, 32, 32), (64, 4, 3, 32, 32), (64, 8, 2, 32, 32), (128, 8, 2, 32, 32), (128, 4, 2, 32, 32),
            (32, 4, 2, 32, 32), (32, 2, 2, 32, 32), (64, 4, 2, 64, 32), (128, 8, 2, 64, 32), (64, 4, 2, 32, 64),
            (128, 8, 2, 64, 64)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--tokens", type=int, nargs="+", default=[197, 138, 97])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("keep_head.py measures GPU speed: no CUDA device found")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    predictors = [dyvm.TokenPredictor(args.dim).to(dev).eval() for _ in args.tokens]
    inputs = []
    for tokens in args.tokens:
        hidden = torch.randn(args.batch_size, tokens, args.dim, device=dev, dtype=torch.bfloat16)
        residual = torch.randn(args.batch_size, tokens, args.dim, device=dev)
        alive = torch.ones(args.batch_size, tokens, device=dev)
        alive[:, tokens // 2] = 0  # the class token
        inputs.append((hidden, alive, residual))

    def forward() -> object:
        with torch.inference_mode(), use_backend("triton"):
            return [p(h, a, r) for p, (h, a, r) in zip(predictors, inputs)]

    names = ("BLOCK_M", "NUM_WARPS", "NUM_STAGES", "BLOCK_K", "BLOCK_C")
    saved = dyvm.FUSED_PREDICTOR_HEAD, [getattr(triton_head, n) for n in names]
    runners: dict[str, Callable[[], object]] = {}
    outputs: dict[str, Any] = {}
    try:
        dyvm.FUSED_PREDICTOR_HEAD = False
        runners["pytorch head"] = capture_graph(forward)
        outputs["pytorch head"] = forward()
        dyvm.FUSED_PREDICTOR_HEAD = True
        for setting in SETTINGS:
            for n, v in zip(names, setting):
                setattr(triton_head, n, v)
            name = "fused, {} rows x {} warps, {} stages, K step {}, H2 step {}".format(*setting)
            runners[name] = capture_graph(forward)
            outputs[name] = forward()
    finally:
        dyvm.FUSED_PREDICTOR_HEAD = saved[0]
        for n, v in zip(names, saved[1]):
            setattr(triton_head, n, v)
    ref = outputs["pytorch head"]
    times = interleaved_times_ms(runners, args.rounds, args.iters, dev)
    base = statistics.median(times["pytorch head"])
    rows = []
    for name, samples in times.items():
        ms = statistics.median(samples)
        # agreement with the PyTorch head (both TF32 products: close, not equal)
        err = max(float((o - r).abs().max()) for o, r in zip(outputs[name], ref))
        rows.append(dict(config=name, ms=round(ms, 4), ms_rounds=[round(t, 4) for t in samples],
                         vs_pytorch=round(ms / base, 3), max_abs_diff_vs_pytorch=err))
    result = dict(benchmark="keep_head", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  batch_size=args.batch_size, dim=args.dim, tokens=args.tokens, rounds=args.rounds,
                  iters=args.iters, rows=rows)
    write_result(args.out, "keep_head", result, markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# DyVM keep predictor, fused head vs PyTorch head: {result['device']}", "",
             f"Width {result['dim']}, batch {result['batch_size']}, stages of {result['tokens']} tokens (one "
             f"predictor call each, together), CUDA graph replays, median of {result['rounds']} interleaved "
             f"rounds x {result['iters']}; torch {result['torch']}.", "",
             "| head | ms (3 stages) | vs PyTorch | max abs diff of the log-probs vs PyTorch |", "|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['config']} | {row['ms']:.4f} | {row['vs_pytorch']:.3f} | "
                     f"{row['max_abs_diff_vs_pytorch']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
