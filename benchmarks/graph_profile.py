"""Where a CUDA-graph forward's GPU time goes: kernel time by kernel name, dense Vim-S vs reduced models.

Captures each configuration's whole forward (bf16 autocast, batch 128 at 224 px by default, random weights) in a
CUDA graph, times the replay, then profiles a few replays with ``torch.profiler`` and sums the kernels' device
time by name. The fixed costs that token reduction cannot shrink (weight casts, the patch embedding, a method's
own kernels) show up as kernels whose time does not fall with the token count.

    python benchmarks/graph_profile.py --out benchmarks/results
    python benchmarks/graph_profile.py --img-size 1024 --batch-size 8 --configs dense --stem graph_profile_1024

Writes ``STEM.{json,md}`` (default ``graph_profile``): configurations dense, R-MeeTo at ratio 0.54 (r = 20), DyVM
rho 0.7 with a static and a per-image block policy at block ratio 0.8 (as in ``benchmarks/compare/dyvm.yaml``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import mambatrim  # noqa: F401  (registers the models)
from mambatrim.engine.benchmark import mean_time_ms
from mambatrim.engine.cuda_graph import capture_graph
from mambatrim.engine.dyvm_selectors import set_per_image_block_policy, set_static_block_policy
from mambatrim.engine.report import write_result
from mambatrim.models.registry import create_model
from mambatrim.reduce import dyvm, rmeeto


CONFIGS = ("dense", "rmeeto 0.54", "dyvm static policy", "dyvm per-image policy")


def build(name: str, state: dict, images: torch.Tensor) -> torch.nn.Module:
    model = create_model("vim_small_patch16_224", img_size=images.shape[-1]).cuda().eval()
    model.load_state_dict(state)
    if name.startswith("rmeeto"):
        model.set_reducer(rmeeto.RMeeToReducer(20, rmeeto.merge_layers(model.depth)))
    elif name.startswith("dyvm"):
        dyvm.apply(model, keep_ratio=0.7, block_ratio=0.8)
        model.cuda().eval()
        if name == "dyvm static policy":
            set_static_block_policy(model, 0.8)
        else:
            set_per_image_block_policy(model, images, 0.8, amp_dtype=torch.bfloat16)
    return model


def profile_replay(replay, reps: int) -> tuple[float, int, list[dict]]:
    """(kernel ms per forward, kernels per forward, per-name rows sorted by time)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            replay()
        torch.cuda.synchronize()
    agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in events:
        agg[e.name][0] += 1
        agg[e.name][1] += e.device_time
    rows = [dict(kernel=k[:100], per_forward=c / reps, us=round(t / reps, 1)) for k, (c, t) in agg.items()]
    rows.sort(key=lambda r: -r["us"])
    return sum(r["us"] for r in rows) / 1e3, round(len(events) / reps), rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--stem", default="graph_profile", help="result file name")
    parser.add_argument("--reps", type=int, default=5, help="profiled replays per configuration")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per configuration in the markdown")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    names = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if not torch.cuda.is_available():
        raise SystemExit("graph_profile.py profiles CUDA graphs: no CUDA device found")
    torch.manual_seed(0)
    state = create_model("vim_small_patch16_224", img_size=args.img_size).state_dict()
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device="cuda")
    configs = {}
    for name in names:
        model = build(name, state, images)

        def forward(m: torch.nn.Module = model) -> None:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                m(images)
        replay = capture_graph(forward)
        walls = [mean_time_ms(replay, 20, images.device) for _ in range(5)]
        kernel_ms, count, rows = profile_replay(replay, args.reps)
        configs[name] = dict(wall_ms=round(statistics.median(walls), 3), kernel_ms=round(kernel_ms, 3),
                             kernels_per_forward=count, kernels=rows[:40])
        print(name, configs[name]["wall_ms"], configs[name]["kernel_ms"], count, flush=True)
        del replay, model
    result = dict(model="vim_small_patch16_224", img_size=args.img_size, batch_size=args.batch_size,
                  precision="bf16 autocast",
                  device=torch.cuda.get_device_name(), torch=torch.__version__, configs=configs)
    write_result(args.out, args.stem, result, to_markdown(result, args.top))
    print(to_markdown(result, args.top))
    return 0


def to_markdown(res: dict, top: int) -> str:
    lines = [f"# CUDA-graph forward, kernel time by kernel: {res['model']}, {res.get('img_size', 224)} px, "
             f"batch {res['batch_size']}, "
             f"{res['precision']}, {res['device']}", "",
             "| config | replay wall ms | kernel ms | kernels per forward |", "|---|---|---|---|"]
    for name, c in res["configs"].items():
        lines.append(f"| {name} | {c['wall_ms']:.3f} | {c['kernel_ms']:.3f} | {c['kernels_per_forward']} |")
    for name, c in res["configs"].items():
        lines += ["", f"## {name}", "", "| kernel | per forward | us per forward |", "|---|---|---|"]
        lines += [f"| `{r['kernel']}` | {r['per_forward']:g} | {r['us']:.1f} |" for r in c["kernels"][:top]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
