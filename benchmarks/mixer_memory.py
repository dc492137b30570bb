"""Vim inference memory: the fused mixer's buffer reuse and the add-norm's in-place stream, against DeiT.

    python benchmarks/mixer_memory.py --out benchmarks/results

Three Vim variants in one process, against timm DeiT of the same size (default SDPA attention), bf16:

* ``separate``: every tensor of its own (policy ``mixer_in_place`` off; a no-op forward hook on the layers,
  which makes the model keep each layer's input stream);
* ``mixer buffer``: in_proj's output, both directions' step sizes and the scan's output in one (b, L, 3E) buffer
  (``mixer_in_place``);
* ``mixer buffer + in-place stream``: also the add-norm writes over its inputs (the defaults).

For each: one eager forward's activations (``resolution_sweep.forward_peak_mib``), the whole run's peak and
img/s replayed from a CUDA graph (``measure_throughput``), in interleaved rounds (the best img/s is kept), and
the largest logit difference from ``separate`` (the variants compute the same values).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resolution_sweep import build, forward_peak_mib  # noqa: E402

from mambatrim.engine.benchmark import measure_throughput  # noqa: E402
from mambatrim.ops import policy, use_backend  # noqa: E402

CONFIGS = [(1024, 8), (768, 8), (224, 128), (1248, 8)]
PEERS = {"vim_small": "deit_small", "vim_tiny": "deit_tiny"}
VARIANTS = {"separate": (False, True), "mixer buffer": (True, True), "mixer buffer + in-place stream": (True, False)}


def run_variant(model: torch.nn.Module, variant: str, bsz: int, img: int) -> dict[str, Any]:
    in_place, hooked = VARIANTS[variant]
    gc.collect()  # the previous measurement's graph and buffers, so that they do not count in this peak
    torch.cuda.empty_cache()
    handles = [layer.register_forward_pre_hook(lambda mod, args: None) for layer in model.layers] if hooked else []
    try:
        with use_backend("triton"), policy.override(mixer_in_place=in_place):
            r = measure_throughput(model, bsz, img, "cuda", "bf16", warmup=3, iters=10, cuda_graph=True)
            mib = forward_peak_mib(model, bsz, img)
            torch.manual_seed(0)
            images = torch.randn(bsz, 3, img, img, device="cuda")
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(images).float()
    finally:
        for h in handles:
            h.remove()
    return {"img_per_s": r["img_per_s"], "peak_mem_mib": r["peak_mem_mib"], "forward_mib": mib,
            "device": r["device_name"], "logits": logits}


def peer_row(name: str, bsz: int, img: int) -> dict[str, Any]:
    gc.collect()
    torch.cuda.empty_cache()
    model = build(name, img).cuda().eval()
    r = measure_throughput(model, bsz, img, "cuda", "bf16", warmup=3, iters=10, cuda_graph=True)
    return {"model": name, "img": img, "batch": bsz, "variant": "-", "img_per_s": r["img_per_s"],
            "peak_mem_mib": r["peak_mem_mib"], "forward_mib": forward_peak_mib(model, bsz, img)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default="vim_small,vim_tiny")
    ap.add_argument("--configs", default=",".join(f"{i}:{b}" for i, b in CONFIGS), help="IMG:BATCH items")
    args = ap.parse_args(argv)
    try:
        configs = [(int(i), int(b)) for i, b in (c.split(":") for c in args.configs.split(","))]
    except ValueError:
        ap.error(f"--configs {args.configs!r}: expected IMG:BATCH[,...]")
    unknown = set(args.models.split(",")) - set(PEERS)
    if unknown:
        ap.error(f"--models: unknown {', '.join(sorted(unknown))}; valid: {', '.join(PEERS)}")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for img, bsz in configs:
        for name in args.models.split(","):
            peer = peer_row(PEERS[name], bsz, img)
            model = build(name, img).cuda().eval()
            best: dict[str, dict[str, Any]] = {}
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    r = run_variant(model, variant, bsz, img)
                    keep = best.get(variant)
                    if keep is None or r["img_per_s"] > keep["img_per_s"]:
                        best[variant] = r
            ref = best["separate"]["logits"]
            for variant, r in best.items():
                logits = r.pop("logits")
                row = {"model": name, "img": img, "batch": bsz, "variant": variant, **r,
                       "max_logit_diff": float((logits - ref).abs().max()),
                       "speed_vs_peer": r["img_per_s"] / peer["img_per_s"],
                       "forward_vs_peer": r["forward_mib"] / peer["forward_mib"],
                       "peak_vs_peer": r["peak_mem_mib"] / peer["peak_mem_mib"]}
                print(row, flush=True)
                out["rows"].append(row)
            out["rows"].append(peer)
            print(peer, flush=True)
            model = None
            torch.cuda.empty_cache()
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "mixer_memory.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Vim inference memory: mixer buffer reuse and in-place stream ({out['device']})", "",
             f"torch {out['torch']}; bf16; img/s replayed from a CUDA graph (best of {args.rounds} interleaved "
             "rounds); forward MiB: one eager forward's activations beyond weights and input; peak MiB: the whole "
             "measurement's max_memory_allocated (weights, warm-up, graph capture). Ratios against the DeiT of the "
             "same size in the same process.", "",
             "| res | batch | model | variant | img/s | forward MiB | peak MiB | vs DeiT: speed | forward MiB | peak "
             "MiB | max logit diff vs separate |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        if r["variant"] == "-":
            lines.append(f"| {r['img']} | {r['batch']} | {r['model']} | - | {r['img_per_s']:,.0f} | "
                         f"{r['forward_mib']:,.0f} | {r['peak_mem_mib']:,.0f} | | | | |")
        else:
            lines.append(f"| {r['img']} | {r['batch']} | {r['model']} | {r['variant']} | {r['img_per_s']:,.0f} | "
                         f"{r['forward_mib']:,.0f} | {r['peak_mem_mib']:,.0f} | {r['speed_vs_peer']:.2f} | "
                         f"{r['forward_vs_peer']:.2f}x | {r['peak_vs_peer']:.2f}x | {r['max_logit_diff']:.1e} |")
    (path / "mixer_memory.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
