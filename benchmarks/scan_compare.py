"""The scan kernels of a baseline ``triton_scan.py`` against the current ones, in one process.

    git show COMMIT:src/mambatrim/ops/triton_scan.py > BASE.py
    python benchmarks/scan_compare.py --baseline BASE.py --variant "unroll 2:scan_fwd_unroll=2" --out DIR

Sections (``--sections``, comma-separated):

* ``kernel``: the fused two-direction forward (bf16, inference) at Vim-S layer shapes from 224 px at batch 128 to
  1024 px at batch 8 (sequence-split there), B and C laid out as the mixer hands them over (columns of x_proj's
  output): baseline, current defaults, and each ``--variant`` (current kernels under other fast-path settings),
  interleaved rounds, with the relative difference of the outputs. GPU time from CUDA-graph replays (as in a
  graphed model), with the eager call's event time and the host's time a call beside it;
* ``switches``: the same forward with per-sample direction switches (DyVM's block selection): both directions,
  only the first, only the second, or each on for 80 % of the samples, at 224 px batch 128 and 1024 px batch 8;
* ``fwd_bwd``: forward + backward (the training forward stores states for the backward), B and C laid out as in
  the kernel section; baseline, current and each variant;
* ``sass``: the forward kernel's loops as compiled on this GPU (instructions per scan step by opcode, registers),
  baseline and current, for the pair at 8 x 768 x 197: the default policy splits that sequence, so the profiled
  kernel is the split's output pass (chunk states carried in); its loops are the states' fold, then the scan,
  per direction;
* ``models``: Vim-S with the baseline scan, the current one and each ``--variant`` against timm DeiT-S (SDPA
  attention) at the sequence-parallel targets' configurations: inference replayed from a CUDA graph, an AdamW
  training step.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resolution_sweep import build, log, pair_inputs, rel  # noqa: E402

from mambatrim.engine.benchmark import cuda_time, graph_time, host_times_ms, measure_throughput  # noqa: E402

KERNEL_SHAPES = [(128, 768, 197), (8, 768, 4097), (8, 768, 2305), (16, 768, 2305), (8, 768, 1025), (64, 768, 577),
                 (8, 768, 577), (8, 768, 197)]
FWD_BWD_SHAPES = [(128, 768, 197), (8, 768, 1025), (8, 768, 4097)]
MODEL_CONFIGS = [(224, 128, "infer"), (1024, 8, "infer"), (768, 8, "infer"), (768, 16, "infer"), (1248, 8, "infer"),
                 (224, 128, "train")]


def load_baseline(path: Path):
    """The baseline module, loaded inside ``mambatrim.ops`` so that its relative imports resolve."""
    spec = importlib.util.spec_from_file_location("mambatrim.ops._scan_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["setting=value", ...]`` -> checked fast-path settings (values typed like the settings' defaults)."""
    from mambatrim.ops import policy

    settings = {}
    for item in items:
        key, _, value = item.partition("=")
        kind = type(policy.SETTINGS[key].default) if key in policy.SETTINGS else str
        settings[key] = (value.lower() in ("1", "true", "on")) if kind is bool else kind(value)
    return policy.validate(**settings)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"NAME:setting=value,setting=value"`` -> (NAME, checked settings)."""
    name, _, body = text.partition(":")
    if not name or not body:
        raise SystemExit(f"--variant {text!r}: expected NAME:setting=value[,setting=value]")
    return name, parse_settings(body.split(","))


def forward_rounds(base, variants: dict[str, dict], ins: list, rounds: int,
                   timers: dict[str, Callable[[Callable], float]], **kwargs: Any) -> tuple[dict, dict]:
    """Interleaved rounds of the fused pair forward (inference) on ``ins``, the baseline and each variant (current
    kernels under its settings): ``{runner: {timer: [µs per round]}}`` and each runner's relative difference from
    the baseline's output."""
    from mambatrim.ops import policy, triton_scan

    runners: dict[str, tuple[Callable, dict]] = {"baseline": (base.selective_scan_pair_triton, {})}
    runners.update({name: (triton_scan.selective_scan_pair_triton, s) for name, s in variants.items()})
    times = {name: {timer: [] for timer in timers} for name in runners}
    errs = {}
    with torch.no_grad():
        ref = base.selective_scan_pair_triton(*ins[:8], True, 0.5, **kwargs)
        for rnd in range(rounds):
            for name, (fn, settings) in runners.items():
                with policy.override(**settings):
                    call = lambda: fn(*ins[:8], True, 0.5, **kwargs)  # noqa: E731
                    if rnd == 0:
                        errs[name] = rel(call(), ref)
                    for timer, time_us in timers.items():
                        times[name][timer].append(round(time_us(call), 1))
    return times, errs


def _host_us(call: Callable) -> float:
    """Median host time of a call, launches queued (synchronised before and after)."""
    torch.cuda.synchronize()
    t = statistics.median(host_times_ms(call, 15)) * 1e3
    torch.cuda.synchronize()
    return t


KERNEL_TIMERS = {"us": lambda call: graph_time(call)["median_ms"] * 1e3,
                 "eager_us": lambda call: cuda_time(call, iters=15, warmup=3)["median_ms"] * 1e3,
                 "host_us": _host_us}


def section_kernel(base, variants: dict[str, dict], rounds: int, out: dict) -> None:
    rows = []
    for bsz, dim, length in KERNEL_SHAPES:
        ins = pair_inputs(bsz, dim, length, 16, torch.bfloat16, dt_rank=-(-dim // 32))  # B, C as Vim's
        times, errs = forward_rounds(base, variants, ins, rounds, KERNEL_TIMERS)
        for name, t in times.items():
            rows.append(dict(batch=bsz, dim=dim, length=length, variant=name, **t, rel_diff=errs[name]))
            log(rows[-1])
        ins = None  # free before the next shape
        torch.cuda.empty_cache()
    out["kernel"] = rows


SWITCH_SHAPES = [(128, 768, 197), (8, 768, 4097)]
SWITCH_PATTERNS = ("all on", "second off", "first off", "80% on")


def section_switches(base, variants: dict[str, dict], rounds: int, out: dict) -> None:
    """The fused pair forward with per-sample direction switches (DyVM's block selection), GPU time from CUDA-graph
    replays: every sample runs both directions, only the first, only the second, or each direction is on for a
    random 80 % of the samples."""
    rows = []
    for bsz, dim, length in SWITCH_SHAPES:
        ins = pair_inputs(bsz, dim, length, 16, torch.bfloat16, dt_rank=-(-dim // 32))
        for pattern in SWITCH_PATTERNS:
            on = torch.ones(bsz, 2, dtype=torch.int32, device="cuda")
            if pattern == "second off":
                on[:, 1] = 0
            elif pattern == "first off":
                on[:, 0] = 0
            elif pattern == "80% on":
                g = torch.Generator(device="cuda").manual_seed(1)
                on = (torch.rand(bsz, 2, device="cuda", generator=g) < 0.8).to(torch.int32)
            times, errs = forward_rounds(base, variants, ins, rounds, {"us": KERNEL_TIMERS["us"]}, direction_on=on)
            for name, t in times.items():
                rows.append(dict(batch=bsz, dim=dim, length=length, pattern=pattern, variant=name, **t,
                                 rel_diff=errs[name]))
                log(rows[-1])
        ins = None
        torch.cuda.empty_cache()
    out["switches"] = rows


def section_fwd_bwd(base, variants: dict[str, dict], rounds: int, out: dict) -> None:
    from mambatrim.ops import policy, triton_scan

    rows = []
    for bsz, dim, length in FWD_BWD_SHAPES:
        n, rank = 16, -(-dim // 32)
        ins = pair_inputs(bsz, dim, length, n, torch.bfloat16)
        xs = [x.detach().clone().requires_grad_() for x in (ins[0], ins[1], ins[2], ins[5], ins[6], ins[7])]
        # B and C as the mixer hands them over: columns of x_proj's output (a leaf here, for their gradients)
        proj = torch.randn(2, bsz, length, rank + 2 * n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(bsz, dim, length, device="cuda", dtype=torch.bfloat16)
        runners: dict[str, tuple[Callable, dict]] = {"baseline": (base.selective_scan_pair_triton, {})}
        runners.update({name: (triton_scan.selective_scan_pair_triton, s) for name, s in variants.items()})
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(rounds):
            for name, (fn, settings) in runners.items():
                def step() -> None:
                    u, delta, A, D, z, bias = xs
                    B = proj[..., rank:rank + n].permute(0, 1, 3, 2)
                    C = proj[..., rank + n:].permute(0, 1, 3, 2)
                    torch.autograd.grad(fn(u, delta, A, B, C, D, z, bias, True, 0.5), [*xs, proj], grad)
                with policy.override(**settings):
                    times[name].append(round(cuda_time(step, iters=5, warmup=2)["median_ms"] * 1e3, 1))
        for name, ts in times.items():
            rows.append(dict(batch=bsz, dim=dim, length=length, variant=name, us=ts))
            log(rows[-1])
        ins = xs = proj = None
        torch.cuda.empty_cache()
    out["fwd_bwd"] = rows


def loop_profile(kernel) -> dict[str, Any]:
    """Registers and the per-iteration opcode counts of every loop of a compiled kernel's SASS."""
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True).stdout
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1).strip())
    loops = []
    for i, text in enumerate(ins):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), len(ins)) < i:
            body = ins[labels[m.group(1)]:i + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)
            loops.append(dict(instructions=len(body), ops=dict(ops.most_common(12))))
    return dict(registers=getattr(kernel, "n_regs", None), spills=getattr(kernel, "n_spills", None), loops=loops)


def section_sass(base, variants: dict[str, dict], rounds: int, out: dict) -> None:
    from mambatrim.ops import policy, triton_scan

    ins = pair_inputs(8, 768, 197, 16, torch.bfloat16)
    rows = {}
    with torch.no_grad():
        base.selective_scan_pair_triton(*ins[:8], True, 0.5)
        rows["baseline"] = loop_profile(base.LAST_FWD)
        for name, settings in variants.items():
            with policy.override(**settings):
                triton_scan.selective_scan_pair_triton(*ins[:8], True, 0.5)
            rows[name] = loop_profile(triton_scan.LAST_FWD)
    for name, row in rows.items():
        log(name, row)
    out["sass"] = rows


def section_models(base, variants: dict[str, dict], rounds: int, out: dict, save: Callable[[], None],
                   configs: list[tuple[int, int, str]]) -> None:
    from mambatrim.ops import policy, triton_scan, use_backend

    current = triton_scan._ScanFn, triton_scan._launch_fwd
    rows = []
    for img, bsz, mode in configs:
        for name in ("deit_small", "vim_small"):
            model = build(name, img).cuda()
            for scan in (("baseline", *variants) * rounds if name == "vim_small" else ("-",)):
                # the scan entry points look their autograd function and launcher up in their module at call
                # time: swapping those two swaps forward and backward kernels together
                if scan == "baseline":
                    triton_scan._ScanFn, triton_scan._launch_fwd = base._ScanFn, base._launch_fwd
                try:
                    with use_backend("triton"), policy.override(**variants.get(scan, {})):
                        r = measure_throughput(model, bsz, img, "cuda", "bf16", warmup=3, iters=10,
                                               train=mode == "train", cuda_graph=mode == "infer")
                finally:
                    triton_scan._ScanFn, triton_scan._launch_fwd = current
                row = dict(model=name, img=img, batch=bsz, mode=mode, scan=scan, img_per_s=r["img_per_s"],
                           peak_mem_mib=r["peak_mem_mib"])
                rows.append(row)
                log(row)
                out["models"] = rows
                save()  # every row kept if a time limit ends the run
            model = None
            torch.cuda.empty_cache()
    out["models"] = rows


def write_markdown(out: dict, path: Path) -> None:
    lines = [f"# Scan kernels: baseline vs current ({out['device']})", "",
             f"torch {out['torch']}, triton {out['triton']}; baseline: {out['baseline']}; variants (current kernels "
             f"under these fast-path settings): {out['variants']}. Interleaved rounds (µs or img/s per round).", ""]
    if out.get("kernel"):
        lines += ["## Fused two-direction forward, bf16, d_state 16 (µs)", "",
                  "GPU time a call: 10 calls replayed from one CUDA graph (the launches cost no host time, as in a "
                  "graphed model). Eager: CUDA events around one eager call, which also count the GPU's wait for "
                  "the host between the call's launches; host: the host's time a call (launches queued, no "
                  "synchronisation). Rows from before these columns timed the eager way only.", "",
                  "| batch x dim x L | variant | GPU µs (rounds) | vs baseline | eager µs | host µs | rel. diff of "
                  "outputs |", "|---|---|---|---|---|---|---|"]
        base = {(r["batch"], r["length"]): min(r["us"]) for r in out["kernel"] if r["variant"] == "baseline"}
        for r in out["kernel"]:
            b = base[r["batch"], r["length"]]
            extra = [", ".join(f"{t:.0f}" for t in r[k]) if k in r else "-" for k in ("eager_us", "host_us")]
            lines.append(f"| {r['batch']} x {r['dim']} x {r['length']} | {r['variant']} | "
                         f"{', '.join(f'{t:.0f}' for t in r['us'])} | {b / min(r['us']):.2f}x | {extra[0]} | "
                         f"{extra[1]} | {r['rel_diff']:.1e} |")
        lines.append("")
    if out.get("switches"):
        lines += ["## Fused pair forward with per-sample direction switches, bf16 (GPU µs, CUDA-graph replays)", "",
                  "| batch x dim x L | directions on | variant | GPU µs (rounds) | vs baseline | rel. diff of "
                  "outputs |",
                  "|---|---|---|---|---|---|"]
        base = {(r["batch"], r["length"], r["pattern"]): min(r["us"]) for r in out["switches"]
                if r["variant"] == "baseline"}
        for r in out["switches"]:
            b = base[r["batch"], r["length"], r["pattern"]]
            lines.append(f"| {r['batch']} x {r['dim']} x {r['length']} | {r['pattern']} | {r['variant']} | "
                         f"{', '.join(f'{t:.0f}' for t in r['us'])} | {b / min(r['us']):.2f}x | {r['rel_diff']:.1e} |")
        lines.append("")
    if out.get("fwd_bwd"):
        lines += ["## Forward + backward, bf16 (µs)", "", "| batch x dim x L | variant | µs (rounds) |",
                  "|---|---|---|"]
        lines += [f"| {r['batch']} x {r['dim']} x {r['length']} | {r['variant']} | "
                  f"{', '.join(f'{t:.0f}' for t in r['us'])} |" for r in out["fwd_bwd"]] + [""]
    if out.get("sass"):
        lines += ["## Forward kernel as compiled here (fused pair, bf16, inference, 8 x 768 x 197: the split's "
                  "output pass; per direction, the chunk states' fold loop, then the scan loop)", "",
                  "| kernel | registers | instructions per loop iteration (top opcodes) |", "|---|---|---|"]
        for name, r in out["sass"].items():
            body = "; ".join(f"{lp['instructions']} ({', '.join(f'{k} {v}' for k, v in list(lp['ops'].items())[:6])})"
                             for lp in r["loops"])
            lines.append(f"| {name} | {r['registers']} | {body} |")
        lines.append("")
    if out.get("models"):
        lines += ["## Vim-S (baseline scan and the current one under each variant) against DeiT-S, bf16 (inference: "
                  "CUDA graph; training: AdamW step)", "",
                  "| res | batch | mode | scan | Vim-S img/s (rounds) | vs baseline | DeiT-S img/s | Vim / DeiT |",
                  "|---|---|---|---|---|---|---|---|"]
        keys = list(dict.fromkeys((r["img"], r["batch"], r["mode"]) for r in out["models"]))
        for img, bsz, mode in keys:
            sel = [r for r in out["models"] if (r["img"], r["batch"], r["mode"]) == (img, bsz, mode)]
            deit = max((r["img_per_s"] for r in sel if r["model"] == "deit_small"), default=None)
            vim = {}
            for r in sel:
                if r["model"] == "vim_small":
                    vim.setdefault(r["scan"], []).append(r["img_per_s"])
            if deit is None or "baseline" not in vim:  # a configuration the run did not finish
                continue
            for scan, ips in vim.items():
                lines.append(f"| {img} | {bsz} | {mode} | {scan} | {', '.join(f'{v:,.0f}' for v in ips)} | "
                             f"{max(ips) / max(vim['baseline']):.2f}x | {deit:,.0f} | {max(ips) / deit:.2f} |")
        lines += ["", "Ratios from the best round; DeiT-S measured once per configuration."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, type=Path, help="a triton_scan.py to compare against")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:setting=value[,...]: the current kernels under other fast-path settings "
                         "(repeatable; 'current:...' changes the current row itself)")
    ap.add_argument("--sections", default="sass,kernel,fwd_bwd,models")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model-configs", help="IMG:BATCH:MODE items, comma-separated (MODE infer or train; default: "
                    + ",".join(f"{i}:{b}:{m}" for i, b, m in MODEL_CONFIGS) + ")")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="scan_compare")
    args = ap.parse_args(argv)
    if not args.baseline.is_file():
        ap.error(f"--baseline {args.baseline}: no such file")
    sections = args.sections.split(",")
    unknown = set(sections) - {"kernel", "switches", "fwd_bwd", "sass", "models"}
    if unknown:
        ap.error(f"--sections: unknown {', '.join(sorted(unknown))}; valid: kernel, switches, fwd_bwd, sass, models")
    configs = MODEL_CONFIGS
    if args.model_configs:
        try:
            configs = [(int(i), int(b), m) for i, b, m in (c.split(":") for c in args.model_configs.split(","))]
        except ValueError:
            ap.error(f"--model-configs {args.model_configs!r}: expected IMG:BATCH:MODE[,...]")
        if any(m not in ("infer", "train") for _, _, m in configs):
            ap.error("--model-configs: MODE must be infer or train")
    import triton

    variants = dict([("current", {})] + [parse_variant(v) for v in args.variant])
    base = load_baseline(args.baseline)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
                           "baseline": args.baseline.name, "variants": variants}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out_dir / f"{args.name}.json").write_text(json.dumps(out, indent=1))
        write_markdown(out, out_dir / f"{args.name}.md")

    for section in sections:
        if section == "models":
            section_models(base, variants, args.rounds, out, save, configs)
        else:
            {"kernel": section_kernel, "switches": section_switches, "fwd_bwd": section_fwd_bwd,
             "sass": section_sass}[section](
                base, variants, args.rounds, out)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
