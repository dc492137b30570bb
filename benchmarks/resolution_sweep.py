"""Vim against DeiT over image resolution, and the sequence-split selective scan on its own.

    python benchmarks/resolution_sweep.py --sections check,scan,models --out benchmarks/results
    python benchmarks/resolution_sweep.py --plot benchmarks/results/resolution_sweep.json   # PNG only

Sections (each adds to ``resolution_sweep.json`` / ``.md``):

* ``check``: the split scan equals the single pass and the sequential reference at L = 4,097 (values and every
  gradient, fp32, both directions of the fused pair, with gaps);
* ``scan``: the fused two-direction forward scan (bf16, inference) and its forward + backward, single pass
  against the split under several ``scan_seq_programs`` / ``scan_seq_chunk`` settings, at Vim-S shapes;
* ``models``: Vim-Ti / Vim-S (Triton backend) against timm DeiT-Ti / DeiT-S (default SDPA attention), same
  process, resolutions 224-1248, batch 8 and 64 (+128 at 224): inference replayed from a CUDA graph (bf16
  autocast) and an AdamW training step (bf16 autocast): img/s, tokens/s, peak memory (the whole run's, and for
  inference one forward's activations). Configurations that run out of memory or past the time budget are listed
  as skipped.

Timing: CUDA events, median over the timed iterations after warm-up (``mambatrim.engine.benchmark``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mambatrim.engine.benchmark import cuda_time, graph_time

RESOLUTIONS = (224, 384, 512, 768, 1024, 1248)
MODELS = {"vim_tiny": dict(embed_dim=192, depth=24), "vim_small": dict(embed_dim=384, depth=24),
          "deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}
TRAIN_MAX_TOKENS = 64 * 1025  # training steps only up to batch x tokens of this (time budget)
# the target table's configurations first, so that a time budget drops the others
ORDER = [(224, 128), (1024, 8), (768, 8), (768, 16), (512, 8), (384, 8), (224, 8), (1248, 8), (224, 64), (384, 64),
         (512, 64), (768, 64), (1024, 64), (1248, 64)]


def log(*a: Any) -> None:
    print(*a, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if torch.isfinite(a).all() else float("nan")


def pair_inputs(bsz: int, dim: int, length: int, n: int, dtype: torch.dtype, gap: bool = False,
                dt_rank: int | None = None) -> list:
    """A Vim layer's scan inputs, token-major (the fused mixer's layout), (2, b, d, L) logical. With ``dt_rank``,
    B and C are columns of an x_proj-like (2, b, L, dt_rank + 2n) output, as the mixer hands them over (row
    stride 56 at Vim-S: not a multiple of 16); otherwise each is its own (2, b, L, n) tensor."""
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    tm = lambda *s: r(2, bsz, length, s[-1]).permute(0, 1, 3, 2).to(dtype)  # noqa: E731
    A = -torch.exp(torch.log(torch.arange(1, n + 1, device="cuda").float()).repeat(2, dim, 1) + 0.3 * r(2, dim, n))
    delta = (r(2, bsz, length, dim) - 2).permute(0, 1, 3, 2).to(dtype)
    gaps = (torch.rand(2, bsz, length, device="cuda", generator=g) * 3).floor() if gap else None
    if dt_rank is None:
        B, C = tm(n), tm(n)
    else:
        proj = r(2, bsz, length, dt_rank + 2 * n).to(dtype)
        B = proj[..., dt_rank:dt_rank + n].permute(0, 1, 3, 2)
        C = proj[..., dt_rank + n:].permute(0, 1, 3, 2)
    return [tm(dim), delta, A, B, C, r(2, dim), r(bsz, length, dim).transpose(1, 2).to(dtype),
            r(2, dim) * 0.5, gaps]


def section_check(out: dict) -> None:
    from mambatrim.ops import policy
    from mambatrim.ops.scan_ref import selective_scan_ref
    from mambatrim.ops.triton_scan import selective_scan_pair_triton

    ins = pair_inputs(2, 64, 4097, 16, torch.float32, gap=True)
    grad = torch.randn(2, 64, 4097, device="cuda")

    def run(fn: Callable) -> list:
        xs = [x.detach().clone().requires_grad_() for x in ins[:8]]
        y = fn(*xs)
        (y * grad).sum().backward()
        return [y.detach()] + [x.grad for x in xs]

    def pair(*xs):
        return selective_scan_pair_triton(*xs, True, 0.5, gap=ins[8])

    def refs(u, delta, A, B, C, D, z, bias):
        return sum(selective_scan_ref(u[i], delta[i], A[i], B[i], C[i], D[i], z, bias[i], True, reverse=i == 1,
                                      gap=ins[8][i]) for i in range(2)) / 2

    with policy.override(scan_seq_split="on", scan_seq_chunk=256):
        split = run(pair)
    with policy.override(scan_seq_split="off"):
        one = run(pair)
    ref = run(refs)
    names = ["y", "u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    res = {"shape": "pair, b=2, d=64, L=4097, n=16, fp32, gaps, chunk 256 (17 chunks)",
           "split_vs_ref": {k: rel(a, c) for k, a, c in zip(names, split, ref)},
           "split_vs_single": {k: rel(a, b) for k, a, b in zip(names, split, one)},
           "single_vs_ref": {k: rel(b, c) for k, b, c in zip(names, one, ref)}}
    log(json.dumps(res, indent=1))
    out["check"] = res


SCAN_SHAPES = [(128, 768, 197), (8, 768, 197), (8, 768, 4097), (64, 768, 4097), (64, 768, 1025), (8, 768, 1025),
               (8, 768, 2305), (64, 768, 577)]
SCAN_VARIANTS = {"single": dict(scan_seq_split="off"), "auto (defaults)": {},
                 **{f"auto p{p} c{c}": dict(scan_seq_programs=p, scan_bwd_seq_programs=p, scan_seq_chunk=c)
                    for p in (8, 16, 32) for c in (32, 64, 128)}}


def section_scan(out: dict, train: bool, variants: list[str] | None) -> None:
    from mambatrim.ops import policy
    from mambatrim.ops.triton_scan import fwd_chunk, pair_split, selective_scan_pair_triton, seq_chunk

    rows = []
    for bsz, dim, length in SCAN_SHAPES:
        ins = pair_inputs(bsz, dim, length, 16, torch.bfloat16)
        fwd = lambda: selective_scan_pair_triton(*ins[:8], True, 0.5)  # noqa: E731
        xs = [x.detach().clone().requires_grad_() for x in ins[:8]]
        grad = torch.randn(bsz, dim, length, device="cuda", dtype=torch.bfloat16)

        def fwd_bwd() -> None:
            y = selective_scan_pair_triton(*xs, True, 0.5)
            torch.autograd.grad(y, xs, grad)

        seen = {}
        for name, settings in SCAN_VARIANTS.items():
            if variants and name not in variants:
                continue
            with policy.override(**settings):
                sms = torch.cuda.get_device_properties(0).multi_processor_count
                split_g = pair_split(length, bsz, dim, sms)  # directions as separate programs
                chunk = fwd_chunk(length, bsz, dim, sms, split_g)
                bwd_chunk = seq_chunk(length, 2 * bsz * -(-dim // policy.get("scan_bwd_block_d")), sms,
                                      multiple=policy.get("scan_ckpt_chunk"), backward=True)
                if (chunk, bwd_chunk, split_g) in seen:  # same launches as an earlier variant
                    rows.append(dict(seen[chunk, bwd_chunk, split_g], variant=name))
                    continue
                with torch.no_grad():
                    t_f = graph_time(fwd)["median_ms"]
                    t_e = cuda_time(fwd, iters=20, warmup=3)["median_ms"]
                t_fb = cuda_time(fwd_bwd, iters=5, warmup=2)["median_ms"] if train and bsz * length <= 128 * 1025 else None
            row = {"batch": bsz, "dim": dim, "length": length, "variant": name, "chunk": chunk, "bwd_chunk": bwd_chunk,
                   "pair_split": split_g, "fwd_us": t_f * 1e3, "fwd_eager_us": t_e * 1e3,
                   "fwd_bwd_us": None if t_fb is None else t_fb * 1e3}
            seen[chunk, bwd_chunk, split_g] = row
            rows.append(row)
            log(row)
        ins = xs = None  # free before the next shape
        torch.cuda.empty_cache()
    out["scan"] = rows


def build(name: str, img: int) -> torch.nn.Module:
    spec = MODELS[name]
    if isinstance(spec, str):
        import timm

        return timm.create_model(spec, pretrained=False, img_size=img, num_classes=1000)
    from mambatrim.models.vim import VisionMamba

    return VisionMamba(img_size=img, patch_size=16, stride=16, num_classes=1000, drop_path_rate=0.0, **spec)


def forward_peak_mib(model: torch.nn.Module, bsz: int, img: int) -> float:
    """MiB one eager inference forward (bf16 autocast, no weight-cast cache) allocates at its peak beyond what was
    allocated before it (weights, input): the activations' working set, free of the whole run's warm-up,
    graph capture and allocator history."""
    images = torch.randn(bsz, 3, img, img, device="cuda")
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        model(images)  # kernels compiled, lazy state built
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(images)
        torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def section_models(out: dict, budget_s: float, train: bool, save: Callable[[], None]) -> None:
    from mambatrim.engine.benchmark import measure_throughput
    from mambatrim.ops import use_backend

    rows = out.setdefault("models", [])
    start = time.time()
    for img, bsz in ORDER:
        tokens = (img // 16) ** 2 + 1
        for name in MODELS:
            for mode in ("infer", "train") if train else ("infer",):
                row = {"model": name, "img": img, "batch": bsz, "tokens": tokens, "mode": mode}
                if time.time() - start > budget_s:
                    row["skipped"] = "time budget"
                elif mode == "train" and bsz * tokens > TRAIN_MAX_TOKENS:
                    row["skipped"] = "time budget (training only up to batch x tokens = 65,600)"
                else:
                    try:
                        model = build(name, img).cuda()
                        with use_backend("triton"):
                            r = measure_throughput(model, bsz, img, "cuda", "bf16", warmup=3, iters=10,
                                                   train=mode == "train", cuda_graph=mode == "infer")
                        row.update(img_per_s=r["img_per_s"], tokens_per_s=r["img_per_s"] * tokens,
                                   median_ms=r["median_ms"], peak_mem_mib=r["peak_mem_mib"],
                                   device=r["device_name"])
                        if mode == "infer":
                            with use_backend("triton"):
                                row["forward_mib"] = forward_peak_mib(model, bsz, img)
                    except torch.cuda.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                    finally:
                        model = None
                        torch.cuda.empty_cache()
                log(row)
                rows.append(row)
                save()  # every row kept if a time limit ends the run


def write_markdown(out: dict, path: Path) -> None:
    lines = [f"# Resolution sweep ({out.get('device', '?')})", "",
             f"torch {out.get('torch')}, triton {out.get('triton')}; settings: {out.get('policy')}", ""]
    if "check" in out:
        c = out["check"]
        lines += [f"## Split scan correctness: {c['shape']}", "", "| tensor | split vs ref | split vs single | "
                  "single vs ref |", "|---|---|---|---|"]
        lines += [f"| {k} | {c['split_vs_ref'][k]:.1e} | {c['split_vs_single'][k]:.1e} | {c['single_vs_ref'][k]:.1e} |"
                  for k in c["split_vs_ref"]] + [""]
    if "scan" in out:
        lines += ["## Fused two-direction scan, bf16, d_state 16 (µs; forward = inference)", "",
                  "Forward: GPU time a call, replayed from a CUDA graph (as in a graphed model); eager: CUDA events "
                  "around one eager call, which also count the GPU's wait for the host's launches. Forward + "
                  "backward: eager.", "",
                  "| batch x dim x L | variant | chunk (fwd / bwd) | directions (fwd) | forward µs | "
                  "forward eager µs | forward + backward µs |", "|---|---|---|---|---|---|---|"]
        for r in out["scan"]:
            fb = "-" if r["fwd_bwd_us"] is None else f"{r['fwd_bwd_us']:.0f}"
            fe = f"{r['fwd_eager_us']:.0f}" if "fwd_eager_us" in r else "-"
            dirs = "separate programs" if r.get("pair_split") else "one program"
            lines.append(f"| {r['batch']} x {r['dim']} x {r['length']} | {r['variant']} | {r['chunk']} / {r['bwd_chunk']} "
                         f"| {dirs} | {r['fwd_us']:.0f} | {fe} | {fb} |")
        lines.append("")
    if out.get("models"):
        lines += ["## Models (bf16; inference replayed from a CUDA graph; training: AdamW step)", "",
                  "| res (tokens) | batch | mode | model | img/s | tokens/s | peak MiB | forward MiB | "
                  "Vim / DeiT (same size): speed, forward MiB |", "|---|---|---|---|---|---|---|---|---|"]
        index = {(r["model"], r["img"], r["batch"], r["mode"]): r for r in out["models"]}
        for r in sorted(out["models"], key=lambda r: (r["img"], r["batch"], r["mode"], r["model"])):
            if "skipped" in r:
                lines.append(f"| {r['img']} ({r['tokens']}) | {r['batch']} | {r['mode']} | {r['model']} | "
                             f"skipped: {r['skipped']} | | | | |")
                continue
            ratio = ""
            if r["model"].startswith("vim"):
                other = index.get((r["model"].replace("vim", "deit"), r["img"], r["batch"], r["mode"]), {})
                if "img_per_s" in other:
                    ratio = f"{r['img_per_s'] / other['img_per_s']:.2f}"
                if "forward_mib" in r and "forward_mib" in other:
                    ratio += f", {r['forward_mib'] / other['forward_mib']:.2f}x"
            fwd = f"{r['forward_mib']:,.0f}" if "forward_mib" in r else "-"
            lines.append(f"| {r['img']} ({r['tokens']}) | {r['batch']} | {r['mode']} | {r['model']} | "
                         f"{r['img_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | {r['peak_mem_mib']:,.0f} | {fwd} | "
                         f"{ratio} |")
    if out.get("targets"):
        lines += ["", "## Targets of the sequence-parallel scan work (H100)", "",
                  "| measure | before | floor | now | met |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in out["targets"]]
    if out.get("scan_old_vs_new_us"):
        o = out["scan_old_vs_new_us"]
        lines += ["", f"Scan kernel before / after ({o['note']}), µs:", ""]
        lines += [f"- {k}: before {v['old']}, after {v['new']}" for k, v in o.items() if k != "note"]
    lines += ["", "Peak memory is ``max_memory_allocated`` over the whole measurement of one model: weights, "
              "warm-up, the CUDA graph's capture (inference) or the optimizer's first step (training), and the "
              "timed iterations. Forward MiB (inference): the peak one eager forward (bf16 autocast, no weight-cast "
              "cache) allocates beyond what was allocated before it (weights, input), i.e. its activations."]
    path.write_text("\n".join(lines) + "\n")


def plot(out: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in out.get("models", []) if "img_per_s" in r and r["mode"] == "infer"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, bsz) in sorted({(r["model"], r["batch"]) for r in rows}):
        pts = sorted((r["img"], r["img_per_s"], r.get("forward_mib", r["peak_mem_mib"])) for r in rows
                     if r["model"] == name and r["batch"] == bsz)
        if len(pts) < 2:
            continue
        style = dict(marker="o" if name.startswith("vim") else "s", linestyle="-" if bsz == 8 else "--",
                     label=f"{name} b{bsz}")
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], **style)
    fwd = all("forward_mib" in r for r in rows)
    for ax, label in zip(axes, ("images / s (bf16, CUDA graph)",
                                "forward peak above weights and input (MiB)" if fwd else "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(RESOLUTIONS)
        ax.set_xticklabels([str(r) for r in RESOLUTIONS])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Vim vs DeiT inference over resolution ({out.get('device', '?')})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="check,scan,models")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="resolution_sweep")
    ap.add_argument("--budget-s", type=float, default=360.0, help="time budget of the models section")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--scan-variants", help="comma-separated names of SCAN_VARIANTS (default: all)")
    ap.add_argument("--plot", help="only draw the PNG from this JSON")
    args = ap.parse_args(argv)
    if args.plot:
        src = Path(args.plot)
        plot(json.loads(src.read_text()), src.with_suffix(".png"))
        write_markdown(json.loads(src.read_text()), src.with_suffix(".md"))
        return 0
    import triton

    from mambatrim.ops import policy

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
                           "policy": {k: v for k, v in policy.current().items() if k.startswith("scan_")}}
    sections = args.sections.split(",")
    if "check" in sections:
        section_check(out)
    if "scan" in sections:
        section_scan(out, not args.no_train, args.scan_variants.split(",") if args.scan_variants else None)
    def save() -> None:
        (out_dir / f"{args.name}.json").write_text(json.dumps(out, indent=1))
        write_markdown(out, out_dir / f"{args.name}.md")

    if "models" in sections:
        section_models(out, args.budget_s, train=not args.no_train, save=save)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
