"""The fused two-direction forward scan at a Vim-S layer shape, three calls, for Nsight Compute to profile.

    ncu -k regex:_scan_fwd_kernel --launch-skip 2 --launch-count 1 --section WarpStateStats \\
        --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \\
        python benchmarks/scan_ncu.py 8 4097 scan_seq_split=off

Arguments: batch, length, then fast-path settings (``name=value``). B and C are columns of an x_proj-like output
(``resolution_sweep.pair_inputs``), bf16, 768 channels, 16 states, inference (output written in place).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resolution_sweep import pair_inputs  # noqa: E402
from scan_compare import parse_settings  # noqa: E402

from mambatrim.ops import policy  # noqa: E402
from mambatrim.ops.triton_scan import selective_scan_pair_triton  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit("usage: scan_ncu.py BATCH LENGTH [setting=value ...]")
    bsz, length = int(argv[0]), int(argv[1])
    settings = parse_settings(argv[2:])
    u, delta, A, B, C, D, z, bias, _ = pair_inputs(bsz, 768, length, 16, torch.bfloat16, dt_rank=24)
    with torch.no_grad(), policy.override(**settings):
        for _ in range(3):
            selective_scan_pair_triton(u, delta, A, B, C, D, z, bias, True, 0.5, out=torch.empty_like(z))
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
