"""How the paired selective scan's time depends on its block shape and on which directions run, on one GPU.

One Vim-S layer's scan (batch 128, 197 tokens, 768 channels, state 16, bf16 activations in the fused mixer's
token-major layout): the pair kernel (both directions in one program per channel block and sample) for several
channel-block sizes and warp counts, with both directions on, a static policy (the backward direction off for
every sample) and a per-image policy (each sample's directions on with probability 0.8, as DyVM's selectors); and, for
comparison, one direction over twice the batch in one launch (the two directions as separate programs).
All programs are resident at once (about 12 one-warp programs per SM) and the kernel is bound by each SM's
throughput (twice the programs take twice as long), so it takes as long as its busiest SM: with random
per-sample work that is about the full load, and per-image skipping only pays where a whole layer skips.

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
from mambatrim.ops.triton_scan import selective_scan_pair_triton, selective_scan_triton  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--length", type=int, default=197)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--blocks", nargs="+", default=["32x1", "64x1", "64x2", "128x2", "128x4"],
                        help="channel block x warps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    bsz = args.batch_size
    inputs = layer_inputs(bsz, args.length, args.dim, 16, gen)
    policies = {
        "both on": None,
        "static: backward off": torch.tensor([[1, 0]] * bsz, dtype=torch.int32),
        "per image, p(on) = 0.8": (torch.rand(bsz, 2, generator=gen) < 0.8).int(),
    }
    policies = {k: None if v is None else v.cuda() for k, v in policies.items()}
    default = (triton_scan.FWD_BLOCK_D, triton_scan.FWD_WARPS)
    runners, settings = {}, {}
    for spec in args.blocks:
        bd, warps = (int(v) for v in spec.split("x"))
        for name, on in policies.items():
            key = f"{spec}|{name}"
            settings[key] = (bd, warps)
            runners[key] = (lambda on=on: selective_scan_pair_triton(*inputs, delta_softplus=True, scale=0.5,
                                                                     direction_on=on))

    # the directions as separate programs of one launch: one direction over 2 x batch sequences (3072 programs of
    # L steps instead of 1536 of 2 L), against the same launch over batch sequences
    u, delta, A, B, C, D, z, bias = inputs
    twice = [t.flatten(0, 1) for t in (u, delta, B, C)]
    once = [t[0] for t in (u, delta, B, C)]
    z2 = torch.cat([z.transpose(1, 2)] * 2).transpose(1, 2)  # token-major, as z
    for spec in args.blocks:
        bd, warps = (int(v) for v in spec.split("x"))
        for name, (uu, dd, bb, cc), zz in (("one direction, batch x 2", twice, z2), ("one direction", once, z)):
            key = f"{spec}|{name}"
            settings[key] = (bd, warps)
            runners[key] = (lambda uu=uu, dd=dd, bb=bb, cc=cc, zz=zz: selective_scan_triton(
                uu, dd, A[0], bb, cc, D[0], zz, bias[0], delta_softplus=True))

    def switch(key: str) -> None:
        triton_scan.FWD_BLOCK_D, triton_scan.FWD_WARPS = settings[key]

    with torch.no_grad():
        times = interleaved_times_ms(runners, args.rounds, args.iters, torch.device("cuda"), switch=switch)
    triton_scan.FWD_BLOCK_D, triton_scan.FWD_WARPS = default
    rows = []
    for key, ts in times.items():
        spec, name = key.split("|")
        on = policies.get(name)
        share = {"one direction": 0.5}.get(name, 1.0) if on is None else on.float().mean().item()
        rows.append(dict(block=spec, policy=name, us=round(statistics.median(ts) * 1e3, 1), executed=round(share, 3),
                         programs=-(-args.dim // settings[key][0]) * bsz))
    result = dict(device=device_name(torch.device("cuda")), torch=torch.__version__, batch_size=bsz,
                  length=args.length, dim=args.dim, default_block=f"{default[0]}x{default[1]}", rows=rows)
    lines = [f"# Paired scan schedule: batch {bsz}, {args.length} tokens, {args.dim} channels, state 16, bf16, "
             f"{result['device']}", "",
             f"Median of {args.rounds} interleaved rounds of {args.iters} launches; library default block "
             f"{result['default_block']} (channels x warps). `executed`: share of (sample, direction) scans run.",
             "", "| block | programs | policy | executed | us | us / executed share of 'both on' |",
             "|---|---|---|---|---|---|"]
    both = {r["block"]: r["us"] for r in rows if r["policy"] == "both on"}
    for r in rows:
        lines.append(f"| {r['block']} | {r['programs']} | {r['policy']} | {r['executed']:.3f} | {r['us']:.1f} | "
                     f"{r['us'] / (both[r['block']] * r['executed']):.2f} |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    write_result(args.out, "scan_schedule", result, markdown)


if __name__ == "__main__":
    main()
