"""R-MeeTo real speed on one GPU: Vim-S at 224, bf16 autocast, batch 128, dense vs merged in ONE process.

Inference: images/s of the dense model and of R-MeeTo at each reduction ratio (median over interleaved timing
rounds, so clock drift hits every configuration alike), speedup over dense, FLOPs ratio (paper convention) and
speedup / FLOPs ratio. (The re-training cost is measured by ``benchmarks/train_profile.py``.) Weights are
random: the work per image does not depend on them. Writes ``rmeeto_speed.json`` and ``rmeeto_speed.md`` into ``--out``.

    python benchmarks/rmeeto_speed.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import platform
import statistics
from typing import Callable

import torch

import mambatrim  # noqa: F401  (registers the models)
from mambatrim.analysis.flops import count_flops
from mambatrim.engine.benchmark import interleaved_times_ms
from mambatrim.engine.cuda_graph import capture_graph
from mambatrim.engine.report import write_result
from mambatrim.models.registry import create_model
from mambatrim.ops import get_backend
from mambatrim.reduce import TokenState, rmeeto
from mambatrim.reduce.rmeeto import merge_tokens


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def check_gpu_merge(dev: torch.device) -> dict:
    """GPU merge == CPU merge (fp32), and the merge itself makes no host-device synchronisation."""
    g = torch.Generator().manual_seed(0)
    bsz, length, dim = 16, 197, 384
    state = TokenState(hidden=torch.randn(bsz, length, dim, generator=g),
                       residual=torch.randn(bsz, length, dim, generator=g),
                       positions=torch.arange(length).repeat(bsz, 1), cls_index=torch.full((bsz,), 98))
    cpu = merge_tokens(merge_tokens(state, 11), 11)
    if dev.type != "cuda":
        return dict(skipped="not a CUDA device")
    gpu_in = state.replace(hidden=state.hidden.to(dev), residual=state.residual.to(dev),
                           positions=state.positions.to(dev), cls_index=state.cls_index.to(dev))
    from mambatrim.reduce.rmeeto_kernels import fused_merge

    checks = {}
    for label, fn in (("pytorch", None), ("fused", fused_merge)):
        merge_tokens(gpu_in, 11, merge_fn=fn)  # warm-up (lazy CUDA init, compilation may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu = merge_tokens(merge_tokens(gpu_in, 11, merge_fn=fn), 11, merge_fn=fn)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checks[label] = ((gpu.hidden.cpu() - cpu.hidden).abs().max().item(),
                         torch.equal(gpu.positions.cpu(), cpu.positions))
    (err, same_positions), (err_fused, same_fused) = checks["pytorch"], checks["fused"]
    print(f"GPU merge vs CPU: max |diff| {err:.2e}, positions equal {same_positions}; fused merge: max |diff| "
          f"{err_fused:.2e}, positions equal {same_fused}; no sync", flush=True)
    return dict(max_abs_diff_hidden=err, positions_equal=same_positions, fused_max_abs_diff_hidden=err_fused,
                fused_positions_equal=same_fused, host_device_syncs=0)


def flops_of(model: torch.nn.Module, img_size: int) -> float:
    """Paper-convention GFLOPs per image (the project's counter; the reducer's matching cost included)."""
    with torch.device("meta"):
        twin = create_model(model.pretrained_cfg["architecture"], img_size=img_size)
    red = model.reducer
    plain = None if red is None else rmeeto.RMeeToReducer(red.r, red.layers, red.cls_position)  # no compile on meta
    return count_flops(twin.set_reducer(plain)).gflops("paper")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vim_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.14, 0.31, 0.42, 0.54])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--recompile-limit", type=int, default=64, help="torch._dynamo cache size (with --compile)")
    parser.add_argument("--iters", type=int, default=10, help="forwards per timing round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--compile", action="store_true", help="also time R-MeeTo with compile=True")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run only)")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if args.compile:  # every merge event has its own r / length: allow one compiled variant per event
        import torch._dynamo as dynamo

        dynamo.config.suppress_errors = True  # a merge that cannot compile runs eagerly (logged), not a crash
        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), args.recompile_limit))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("rmeeto_speed.py measures GPU speed: no CUDA device found (--device cpu: smoke run)")
    gpu_check = check_gpu_merge(dev)
    torch.manual_seed(0)
    model = create_model(args.model).to(dev).eval()
    depth, tokens0 = model.depth, model.patch_embed.num_patches + 1
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=dev)

    # per ratio: the default (the fused Triton merge on a GPU), the PyTorch merge, and (--compile) the PyTorch
    # merge through torch.compile
    configs: list[tuple[str, int, bool, bool | None]] = [("dense", 0, False, None)]
    for ratio in args.ratios:
        r = rmeeto.r_for_ratio(ratio, tokens0, depth)
        configs.append((f"{ratio:.2f}", r, False, None))
        configs.append((f"{ratio:.2f} pytorch merge", r, False, False))
        if args.compile:
            configs.append((f"{ratio:.2f} pytorch merge+compile", r, True, False))
    reducers = {name: rmeeto.RMeeToReducer(r, rmeeto.merge_layers(depth), compile=comp, fused=fused)
                for name, r, comp, fused in configs if r > 0}

    def attach(name: str) -> None:
        model.set_reducer(reducers.get(name))

    def forward() -> None:
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=False):
            model(images)

    def captured(name: str) -> Callable[[], object]:
        """One CUDA graph of the whole forward with this reducer (possible: the merge never syncs the host)."""
        attach(name)
        return capture_graph(forward)

    # ------------------------------------------------------------------ inference, interleaved rounds
    for name, *_ in configs:
        attach(name)
        for _ in range(args.warmup):
            forward()
    sync(dev)
    runners: dict[tuple[str, str], Callable[[], object]] = {}
    for name, *_ in configs:
        runners[("eager", name)] = forward
        if dev.type == "cuda":
            runners[("cuda_graph", name)] = captured(name)
    sync(dev)
    samples = {key: [args.batch_size / ms * 1000.0 for ms in times] for key, times in interleaved_times_ms(
        runners, args.rounds, args.iters, dev, switch=lambda key: attach(key[1])).items()}
    rows = []
    dense_flops = flops_of(model.set_reducer(None), args.img_size)
    modes = sorted({mode for mode, _ in runners}, key=lambda m: m != "cuda_graph")
    for mode in modes:
        dense_ips = statistics.median(samples[(mode, "dense")])
        for name, r, *_ in configs:
            attach(name)
            ips = statistics.median(samples[(mode, name)])
            flops = flops_of(model, args.img_size)
            layers = rmeeto.tokens_per_layer(tokens0, depth, r, rmeeto.merge_layers(depth))
            flops_ratio = dense_flops / flops
            speedup = ips / dense_ips
            rows.append(dict(mode=mode, config=name, r=r,
                             reduction_ratio=round(rmeeto.ratio_for_r(r, tokens0, depth), 4),
                             tokens_last_block=layers[-1], images_per_s=round(ips, 1),
                             images_per_s_rounds=[round(v, 1) for v in samples[(mode, name)]],
                             speedup=round(speedup, 3), gflops=round(flops, 3), flops_ratio=round(flops_ratio, 3),
                             speedup_over_flops_ratio=round(speedup / flops_ratio, 3)))
            print(f"{mode:>10} {name:>6} r={r:2d} {ips:8.1f} img/s  speedup {speedup:.3f}x  GFLOPs {flops:.2f}  "
                  f"FLOPs ratio {flops_ratio:.3f}", flush=True)
    del runners

    result = dict(
        model=args.model, img_size=args.img_size, batch_size=args.batch_size, precision="bf16 autocast",
        device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke run)", torch=torch.__version__, python=platform.python_version(),
        scan_backend=get_backend(dev.type), rounds=args.rounds, iters_per_round=args.iters,
        inference=rows, gpu_merge_check=gpu_check,
    )
    write_result(args.out, "rmeeto_speed", result, to_markdown(result))
    print(to_markdown(result))
    return 0


def to_markdown(res: dict) -> str:
    lines = [f"# R-MeeTo speed: {res['model']} at {res['img_size']}, {res['precision']}, batch {res['batch_size']}",
             "", f"Device: {res['device']}; torch {res['torch']}; scan backend `{res['scan_backend']}`; median "
             f"of {res['rounds']} interleaved rounds of {res['iters_per_round']} forwards. Random weights.", "",
             "`cuda_graph`: the whole forward captured once per configuration and replayed (launch overhead "
             "removed; the merge is capturable because it never synchronises with the host). `eager`: plain "
             "PyTorch launches (host-bound for Vim-S at this batch).", "",
             "| mode | config | r | tokens at last block | img/s | speedup | GFLOPs | FLOPs ratio | "
             "speedup / FLOPs ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for row in res["inference"]:
        lines.append(f"| {row['mode']} | {row['config']} | {row['r']} | {row['tokens_last_block']} | {row['images_per_s']:.0f} | "
                     f"{row['speedup']:.3f}x | {row['gflops']:.2f} | {row['flops_ratio']:.3f} | "
                     f"{row['speedup_over_flops_ratio']:.2f} |")
    lines += ["", "The re-training cost (the engine's training step, frozen teacher included) is measured by "
              "`benchmarks/train_profile.py` (`train_profile.md`)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
