"""How the paired selective scan's time depends on its block shape, the batch and which directions run, on one GPU.

One Vim-S layer's scan (197 tokens, 768 channels, state 16, bf16 activations in the fused mixer's token-major
layout): the pair kernel (both directions in one program per channel block and sample) for several
channel-block sizes and warp counts, with both directions on, a static policy (the backward direction off for
every sample) and a per-image policy (each sample's directions on with probability 0.8, as DyVM's selectors),
at batch 128; and both directions on over a sweep of batch sizes at the library's default block. Each row also
gives the compiled kernel's registers per thread and how many of its programs the SM's registers hold at once.

What it showed on an H200 (``scan_schedule.md``): with both directions on, the default kernel takes about
310 us for 64-88 samples and steps to about 380 us from 96 samples on, where more than 8 one-warp programs
share an SM (the registers would hold 12). A program that runs both directions walks twice the steps of one
that runs one; with random per-image decisions nearly every SM hosts such programs, so the launch takes as long
as with everything on, while the static policy halves every program and the time. docs/dyvm.md lists the
schedules tried against this. Two of them were timed by this script and then removed, both slower: the step loop
unrolled 2x / 4x and a kernel walking both directions in one L-step loop; their code and tables are in the
project history.

    python benchmarks/scan_schedule.py --out benchmarks/results

Writes ``scan_schedule.{json,md}``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from mambatrim.engine.benchmark import device_name, interleaved_times_ms  # noqa: E402
from mambatrim.engine.report import write_result  # noqa: E402
from mambatrim.ops import triton_scan  # noqa: E402
from mambatrim.ops.triton_scan import selective_scan_pair_triton  # noqa: E402


def layer_inputs(bsz: int, length: int, dim: int, state: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Scan inputs laid out as the fused mixer produces them (token-major activations, x_dbl views)."""
    dev, bf = "cuda", torch.bfloat16
    u = torch.randn(2, bsz, length, dim, generator=gen).to(dev, bf).permute(0, 1, 3, 2)
    delta = (torch.randn(2, bsz, length, dim, generator=gen) * 0.5 - 1).to(dev, bf).permute(0, 1, 3, 2)
    x_dbl = torch.randn(2, bsz, length, 2 * state, generator=gen).to(dev, bf)
    B, C = x_dbl[..., :state].permute(0, 1, 3, 2), x_dbl[..., state:].permute(0, 1, 3, 2)
    A = -torch.arange(1, state + 1, dtype=torch.float32).repeat(2, dim, 1).to(dev)
    D = torch.ones(2, dim, device=dev)
    z = torch.randn(bsz, length, dim, generator=gen).to(dev, bf).transpose(1, 2)
    bias = torch.zeros(2, dim, device=dev)
    return [u, delta, A, B, C, D, z, bias]


def batch_slice(inputs: list[torch.Tensor], bsz: int) -> list[torch.Tensor]:
    """The first ``bsz`` samples of :func:`layer_inputs` (views; A, D and bias have no batch axis)."""
    u, delta, A, B, C, D, z, bias = inputs
    return [u[:, :bsz], delta[:, :bsz], A, B[:, :bsz], C[:, :bsz], D, z[:bsz], bias]


def resident_per_sm(n_regs: int, warps: int) -> int:
    """Programs an SM's registers hold at once (registers are allocated per warp in units of 256)."""
    if n_regs <= 0:  # not reported by this Triton
        return 0
    props = torch.cuda.get_device_properties(0)
    per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    per_warp = -(-n_regs * 32 // 256) * 256
    return min(32, per_sm // (per_warp * warps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[40, 64, 88, 96, 112],
                        help="further batch sizes timed with both directions on at the default block")
    parser.add_argument("--length", type=int, default=197)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--blocks", nargs="+", default=["32x1", "64x1", "128x2"],
                        help="channel block x warps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    bsz = args.batch_size
    inputs = layer_inputs(max([bsz, *args.batches]), args.length, args.dim, 16, gen)
    policies = {
        "both on": None,
        "static: backward off": torch.tensor([[1, 0]] * bsz, dtype=torch.int32),
        "per image, p(on) = 0.8": (torch.rand(bsz, 2, generator=gen) < 0.8).int(),
    }
    policies = {k: None if v is None else v.cuda() for k, v in policies.items()}
    default = (triton_scan.FWD_BLOCK_D, triton_scan.FWD_WARPS)
    default_spec = f"{default[0]}x{default[1]}"
    cases: dict[str, tuple[int, int, int, str]] = {}  # key -> (block, warps, batch, policy)
    for spec in args.blocks:
        bd, warps = (int(v) for v in spec.split("x"))
        for name in policies:
            cases[f"{spec}|{bsz}|{name}"] = (bd, warps, bsz, name)
    for b in args.batches:
        cases[f"{default_spec}|{b}|both on"] = (*default, b, "both on")
    runners = {key: (lambda b=b, name=name: selective_scan_pair_triton(
        *batch_slice(inputs, b), delta_softplus=True, scale=0.5, direction_on=policies[name]))
        for key, (_, _, b, name) in cases.items()}

    def switch(key: str) -> None:
        triton_scan.FWD_BLOCK_D, triton_scan.FWD_WARPS = cases[key][:2]

    regs = {}
    with torch.no_grad():
        for key, fn in runners.items():
            switch(key)
            fn()
            regs[key] = getattr(triton_scan.LAST_FWD, "n_regs", 0)
        times = interleaved_times_ms(runners, args.rounds, args.iters, torch.device("cuda"), switch=switch)
    triton_scan.FWD_BLOCK_D, triton_scan.FWD_WARPS = default
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for key, ts in times.items():
        bd, warps, b, name = cases[key]
        on = policies[name]
        per_sm = resident_per_sm(regs[key], warps)
        rows.append(dict(block=f"{bd}x{warps}", batch=b, policy=name, us=round(statistics.median(ts) * 1e3, 1),
                         executed=1.0 if on is None else round(on.float().mean().item(), 3),
                         programs=-(-args.dim // bd) * b, registers=regs[key], resident_per_sm=per_sm,
                         resident=per_sm * sms))
    result = dict(device=device_name(torch.device("cuda")), torch=torch.__version__, batch_size=bsz,
                  length=args.length, dim=args.dim, sms=sms, default_block=default_spec, rows=rows)
    lines = [f"# Paired scan schedule: {args.length} tokens, {args.dim} channels, state 16, bf16, "
             f"{result['device']} ({sms} SMs)", "",
             f"Median of {args.rounds} interleaved rounds of {args.iters} launches; library default block "
             f"{default_spec} (channels x warps). `executed`: share of (sample, direction) scans run; `resident`: "
             "programs the SMs' registers hold at once (programs beyond that start as earlier ones finish).",
             "", "| block | batch | programs | registers | resident | policy | executed | us | "
             "us / executed share of 'both on' |", "|---|---|---|---|---|---|---|---|---|"]
    both = {(r["block"], r["batch"]): r["us"] for r in rows if r["policy"] == "both on"}
    for r in rows:
        lines.append(f"| {r['block']} | {r['batch']} | {r['programs']} | {r['registers']} | {r['resident']} | "
                     f"{r['policy']} | {r['executed']:.3f} | {r['us']:.1f} | "
                     f"{r['us'] / (both[(r['block'], r['batch'])] * r['executed']):.2f} |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    write_result(args.out, "scan_schedule", result, markdown)


if __name__ == "__main__":
    main()
