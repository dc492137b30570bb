"""Where a reduction method's GPU time goes: CUDA kernel time of one Vim-S forward, dense vs reduced, by op.

Runs eager forwards (bf16 autocast, batch 128) under ``torch.profiler`` and charges each CUDA kernel to the op
that launched it (each kernel counted once), split into the method's own work (its ``before_layer`` hook:
pruning, merging, ...) and the backbone. The per-op table compares the backbone's ops with the dense model's
and with the share of work the method's FLOPs say should remain, to show which ops do not shrink in proportion.

    python benchmarks/reducer_profile.py --method dyvm --set keep_ratio=0.7 --set block_ratio=null
    python benchmarks/reducer_profile.py --method rmeeto --set ratio=0.31

Writes ``{method}_reducer_profile.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import mambatrim  # noqa: F401  (registers the models)
from mambatrim.analysis.flops import count_flops
from mambatrim.models.registry import create_model
from mambatrim.reduce import apply_method, parse_method_options

RANGE = "reducer_hook"


def kernel_times(model: torch.nn.Module, images: torch.Tensor, reps: int = 3) -> tuple[dict, dict]:
    """Per-forward kernel ms by launching op: (outside the method's hook, inside it)."""
    def fwd() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(images)
    for _ in range(3):
        fwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fwd()
        torch.cuda.synchronize()
    inside: dict[str, float] = defaultdict(float)
    outside: dict[str, float] = defaultdict(float)
    for e in prof.events():
        kernels = getattr(e, "kernels", None) or []
        dur = sum(k.duration for k in kernels)  # us of the kernels this op launched itself
        if not dur:
            continue
        parent, in_hook = e.cpu_parent, False
        while parent is not None and not in_hook:
            in_hook = parent.name == RANGE
            parent = parent.cpu_parent
        (inside if in_hook else outside)[e.name] += dur
    n = 1000.0 * reps
    return {k: v / n for k, v in outside.items()}, {k: v / n for k, v in inside.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model", default="vim_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("reducer_profile.py profiles GPU kernels: no CUDA device found")
    options = parse_method_options(args.options)
    torch.manual_seed(0)
    model = create_model(args.model).cuda().eval()
    images = torch.randn(args.batch_size, 3, 224, 224, device="cuda")
    dense_gflops = count_flops(model).gflops("paper")
    dense, _ = kernel_times(model, images)
    apply_method(model, args.method, **options)
    model.eval()
    hook = model.reducer.before_layer

    def timed(layer_idx, state):
        with record_function(RANGE):
            return hook(layer_idx, state)

    model.reducer.before_layer = timed
    reduced, in_hook = kernel_times(model, images)
    gflops = count_flops(model, images=images[:2]).gflops("paper")
    share = gflops / dense_gflops
    total_d, total_r, total_h = sum(dense.values()), sum(reduced.values()), sum(in_hook.values())
    lines = [
        f"# Kernel time by op: {args.model}, bf16, batch {args.batch_size}, {args.method} {options}", "",
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}. Sum of CUDA kernel durations per eager forward, "
        "each kernel charged to the op that launched it (launch gaps excluded).", "",
        f"FLOPs (paper convention): dense {dense_gflops:.3f} G, {args.method} {gflops:.3f} G: "
        f"{100 * share:.1f} % of dense.", "",
        "| | kernel ms | of dense |", "|---|---|---|",
        f"| dense | {total_d:.2f} | 100 % |",
        f"| {args.method}, backbone | {total_r:.2f} | {100 * total_r / total_d:.1f} % |",
        f"| {args.method}, its own hook | {total_h:.2f} | {100 * total_h / total_d:.1f} % |",
        f"| {args.method}, total | {total_r + total_h:.2f} | {100 * (total_r + total_h) / total_d:.1f} % |", "",
        "Backbone ops, dense vs reduced (ms per forward; ``expected`` = dense x the FLOPs share):", "",
        "| op | dense | reduced | expected | excess |", "|---|---|---|---|---|"]
    for name, ms in sorted(dense.items(), key=lambda kv: -kv[1])[:20]:
        got = reduced.get(name, 0.0)
        lines.append(f"| `{name[:60]}` | {ms:.3f} | {got:.3f} | {ms * share:.3f} | {got - ms * share:+.3f} |")
    extra = {k: v for k, v in reduced.items() if k not in dense}
    if extra:
        lines += ["", "Backbone ops only the reduced model launches (ms): " +
                  ", ".join(f"`{k[:50]}` {v:.3f}" for k, v in sorted(extra.items(), key=lambda kv: -kv[1])[:10])]
    lines += ["", "Costliest ops inside the method's hook (ms per forward):", "", "| op | ms |", "|---|---|"]
    for name, ms in sorted(in_hook.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"| `{name[:60]}` | {ms:.3f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.method}_reducer_profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
