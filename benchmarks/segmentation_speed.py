"""UperNet-Vim-S at 512x512 on one GPU: dense vs DyVM vs R-MeeTo, backbone and head timed separately.

One process, one model per configuration (the same weights; each method attached once); the backbone step
(embedding, 24 blocks, the dense restoration of pruned / merged tokens at the four taps) and the head step
(neck + UperNet on those maps, logits upsampled to 512x512) are each captured as a CUDA graph and timed in
interleaved rounds (every configuration once per round). Each configuration's replayed feature maps are
compared with its first eager forward's (``max abs diff vs eager``: 0 for a deterministic forward). Peak memory,
for the whole model and for the backbone and the head on their own: the part's weights (and, for the head, its
input maps) plus the most one eager forward of that part allocates (the other configurations' models and graphs,
alive in the same process, are not counted). Backbone and head GFLOPs per
image by ``segmentation_flops`` (what ran, method included). bf16 autocast, inference.

DyVM here is untrained: rho 0.8 token pruning before blocks 6 / 12 / 18 (top-k of the predictor's score, so
the token counts are the trained model's); its direction selectors start at a bias that runs every direction,
so the block-selection saving of a trained model is not in these numbers. R-MeeTo merges before every second
block at the paper's reduction ratio 0.31 (``--rmeeto-ratio``), training-free.

    PYTHONPATH=src python benchmarks/segmentation_speed.py --out benchmarks/results

Writes ``segmentation_speed.json`` and ``segmentation_speed.md`` (the card's name inside).
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable, Sequence

import torch

from mambatrim.engine.benchmark import device_name, interleaved_times_ms
from mambatrim.engine.cuda_graph import capture_graph
from mambatrim.engine.precision import autocast_to
from mambatrim.engine.report import write_result
from mambatrim.engine.segmentation import segmentation_flops
from mambatrim.models.segmentation import create_segmentation_model
from mambatrim.ops import policy
from mambatrim.reduce import apply_method, parse_method_options


def configurations(args: argparse.Namespace) -> dict[str, tuple[str | None, dict[str, Any]]]:
    return {
        "dense": (None, {}),
        "dyvm": ("dyvm", {"keep": 0.8, "block_ratio": 0.8, "layers": [6, 12, 18]}),
        "rmeeto": ("rmeeto", {"ratio": args.rmeeto_ratio}),
    }


def build(args: argparse.Namespace, device: torch.device, method: str | None, opts: dict[str, Any],
          weights: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """A model of its own for one configuration (the dense weights, the method attached once): captured graphs
    read their model's parameters, buffers and caches, so no configuration may re-attach another's method."""
    model = create_segmentation_model(args.backbone, num_classes=150, img_size=args.size,
                                      **parse_method_options(args.backbone_opt))
    if weights is not None:
        model.load_state_dict(weights)
    if method is not None:
        apply_method(model.backbone, method, **opts)
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default="segmentation_speed")
    parser.add_argument("--backbone", default="vim_small_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rmeeto-ratio", type=float, default=0.31, help="R-MeeTo's reduction ratio")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="dense plus these configurations only")
    parser.add_argument("--device", default="cuda", help="cuda; cpu (eager, no memory figure) checks the script")
    parser.add_argument("--backbone-opt", action="append", metavar="KEY=VALUE", default=[],
                        help="backbone config override (e.g. depth=4 for a quick check)")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.eager = args.eager or device.type != "cuda"
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    configs = configurations(args)
    if args.only:
        unknown = set(args.only) - set(configs)
        if unknown or "dense" not in args.only:
            parser.error(f"--only takes dense plus any of {sorted(configs)}, got {args.only}")
        configs = {name: configs[name] for name in args.only}
    dtype = torch.bfloat16 if device.type == "cuda" else None
    amp = lambda: autocast_to(device, dtype, cache_enabled=False)  # noqa: E731
    runners: dict[str, Callable[[], object]] = {}
    memory: dict[str, float] = {}
    drift: dict[str, float] = {}  # max |replayed - eager| over the four feature maps
    flops: dict[str, dict[str, float]] = {}  # backbone / head GFLOPs per image (what ran, method included)
    models: dict[str, torch.nn.Module] = {}
    for name, (method, opts) in configs.items():
        weights = None if not models else models["dense"].state_dict()
        model = models[name] = build(args, device, method, opts, weights)
        flops[name] = segmentation_flops(model, images[:1])
        with torch.no_grad(), amp():
            maps, _ = model.forward_backbone(images)
        static_maps = [m.clone() for m in maps]
        replayed: dict[str, list[torch.Tensor]] = {}

        def backbone(model=model, replayed=replayed) -> None:
            with torch.no_grad(), amp():
                replayed["maps"] = model.forward_backbone(images)[0]

        def head(model=model, maps=static_maps) -> None:
            with torch.no_grad(), amp():
                model.forward_head(maps, images.shape[2:])

        head_modules = [m for n, m in model.named_children() if n != "backbone"]
        memory[name] = {
            "peak_memory_gib": peak_memory_gib([model], lambda: model(images), amp, device),
            "backbone_peak_memory_gib": peak_memory_gib([model.backbone], lambda: model.forward_backbone(images),
                                                        amp, device),
            "head_peak_memory_gib": peak_memory_gib(head_modules, head, amp, device, static_maps)}
        runners[f"{name}/backbone"] = backbone if args.eager else capture_graph(backbone)
        runners[f"{name}/head"] = head if args.eager else capture_graph(head)
        runners[f"{name}/backbone"]()  # the replay (eager: a second forward) must give the first forward's maps
        drift[name] = max((a.float() - b.float()).abs().max().item() for a, b in zip(replayed["maps"], static_maps))
        print(f"{name}: ready ({'eager' if args.eager else 'captured'})", flush=True)

    times = interleaved_times_ms(runners, args.rounds, args.iters, device)
    rows = {}
    for name in configs:
        b, h = statistics.median(times[f"{name}/backbone"]), statistics.median(times[f"{name}/head"])
        rows[name] = {"backbone_ms": b, "head_ms": h, "total_ms": b + h,
                      "backbone_img_s": args.batch * 1e3 / b, "head_img_s": args.batch * 1e3 / h,
                      "img_s": args.batch * 1e3 / (b + h), **memory[name],
                      "max_abs_diff_vs_eager": drift[name], **flops[name],
                      "method": configs[name][0], "method_opts": configs[name][1],
                      "rounds_ms": {"backbone": times[f"{name}/backbone"], "head": times[f"{name}/head"]}}
    record = {"device": device_name(device), "torch": torch.__version__, "backbone": args.backbone,
              "backbone_opts": parse_method_options(args.backbone_opt),
              "batch": args.batch, "size": args.size, "dtype": "bf16" if dtype else "fp32",
              "cuda_graph": not args.eager,
              "policy": policy.current(), "rows": rows}
    markdown = to_markdown(record)
    write_result(args.out, args.stem, record, markdown)
    print(markdown)


def peak_memory_gib(modules: list[torch.nn.Module], fn: Callable[[], object], amp: Callable[[], Any],
                    device: torch.device, inputs: Sequence[torch.Tensor] = ()) -> float:
    """GiB one configuration's ``fn`` needs on its own (NaN off CUDA): the weights and buffers of ``modules``
    and the ``inputs`` it reads, plus the most that one eager call allocates on top of what is already held. The
    models and graph pools of the configurations built before it stay allocated in this process, so the raw
    ``max_memory_allocated`` would count them too."""
    if device.type != "cuda":
        return float("nan")
    tensors = [*inputs, *(t for m in modules for t in (*m.parameters(), *m.buffers()))]
    own = sum(t.numel() * t.element_size() for t in tensors)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device)
    with torch.no_grad(), amp():
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - held + own) / 2**30


def _gflops(row: dict[str, Any], dense: dict[str, Any]) -> str:
    """Backbone GFLOPs per image and dense's over this row's ('-' in records from before they were counted)."""
    if "backbone_gflops" not in row:
        return "-"
    return f"{row['backbone_gflops']:.1f} ({dense['backbone_gflops'] / row['backbone_gflops']:.2f}x)"


def _memory(row: dict[str, Any]) -> str:
    """'backbone / head / whole' GiB ('-' for parts that records from before the split lack)."""
    parts = [row.get(k) for k in ("backbone_peak_memory_gib", "head_peak_memory_gib", "peak_memory_gib")]
    return " / ".join("-" if v is None else f"{v:.2f}" for v in parts)


def to_markdown(r: dict[str, Any]) -> str:
    dense = r["rows"]["dense"]
    lines = [
        f"# UperNet-{r['backbone']} at {r['size']}x{r['size']}: dense vs DyVM vs R-MeeTo ({r['device']})",
        "",
        f"Batch {r['batch']}, {r['dtype']}, {'CUDA graphs' if r['cuda_graph'] else 'eager'}, one process, "
        f"interleaved rounds (median). Backbone = embedding + blocks + restoration of every token at the four "
        f"taps; head = neck + UperNet + upsampling. torch {r['torch']}.",
        "",
        "| model | backbone img/s | head img/s | total img/s | speed-up (total) | backbone speed-up | "
        "peak memory GiB (backbone / head / whole) | max abs diff vs eager | backbone GFLOPs (ratio) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in r["rows"].items():
        lines.append(f"| {name} {row['method_opts'] or ''} | {row['backbone_img_s']:.1f} | {row['head_img_s']:.1f} | "
                     f"{row['img_s']:.1f} | {row['img_s'] / dense['img_s']:.3f}x | "
                     f"{row['backbone_img_s'] / dense['backbone_img_s']:.3f}x | {_memory(row)} | "
                     f"{row.get('max_abs_diff_vs_eager', float('nan')):.3g} | {_gflops(row, dense)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
