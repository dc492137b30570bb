"""DyVM real speed on one GPU: Vim-S at 224, bf16 autocast, batch 128, dense vs DyVM in ONE process.

Configurations (inference, ``dyvm.deploy``): dense; DyVM token pruning only (rho); DyVM block selection only; DyVM
tokens + blocks. The weights are random, so the block selectors are set to a *static* policy that switches off
``round((1 - block_ratio) * 2 * depth)`` (layer, direction) pairs spread over the depth (weight 0, bias -5 for
those pairs, +5 elsewhere), which fixes the realistic amount of skipped work; and a *per-image* policy (random
selector weights, biases calibrated so each direction is off for ``1 - block_ratio`` of the images), where, as
with trained selectors, images differ in what they skip. ``--direction-shares`` adds a per-image row whose
selectors run each (layer, direction) for the share of images a trained model's selectors did (a
``dyvm_cifar10.py`` result): trained selectors settle many pairs for every image, and how many sets how much
per-image skipping costs. The realised ratio is read back from the mixers and reported. Timing: interleaved
rounds (clock drift hits every configuration alike), CUDA events, median over rounds; eager, and under CUDA
graphs (every path has static shapes and no host sync; each compared with the dense model in the same mode).
FLOPs from the project's counter (paper convention = one direction's SSM terms scaled by the executed-direction
fraction; and the full count). ``--unfused-prune-steps`` adds, for every DyVM configuration that prunes
tokens, a CUDA-graph row captured with DyVM's three fused pruning steps off (the Triton row gather,
policy ``fused_row_gather``, the predictor's add + LayerNorm, ``fused_predictor_norm``, and its
MLP head, ``fused_predictor_head``, all on by default); ``--pytorch-keep-head`` one with only the head
off. Both are timed in the same rounds as the default rows.

    python benchmarks/dyvm_speed.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
from typing import Any, Callable

import torch

import mambatrim  # noqa: F401  (registers the models)
from mambatrim.engine.benchmark import interleaved_times_ms, mean_time_ms
from mambatrim.engine.cuda_graph import capture_graph
from mambatrim.engine.report import write_result
from mambatrim.models.registry import create_model
from mambatrim.ops import get_backend, policy
from mambatrim.reduce import dyvm

UNFUSED = ", unfused prune steps"
PYTORCH_HEAD = ", PyTorch keep head"


@contextlib.contextmanager
def fused_prune_steps(gather_and_norm: bool, head: bool):
    """DyVM's fused pruning steps on or off inside the block: the row gather and the predictor's add + LayerNorm
    (``gather_and_norm``), the predictor's MLP head (``head``)."""
    with policy.override(fused_row_gather=gather_and_norm, fused_predictor_norm=gather_and_norm,
                         fused_predictor_head=head):
        yield


def set_static_block_policy(model: torch.nn.Module, block_ratio: float) -> list[tuple[int, int]]:
    """Selectors that switch off the same (layer, direction) pairs for every image; returns the pairs."""
    selectors = model.reducer.selectors
    depth = len(selectors)
    n_off = round((1.0 - block_ratio) * 2 * depth)
    layers = [round(1 + i * (depth - 2) / max(1, n_off - 1)) for i in range(n_off)] if n_off else []
    off = [(layer, i % 2) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for sel in selectors:
            sel.weight.zero_()
            sel.bias.fill_(5.0)
        for layer, direction in off:
            selectors[layer].bias[direction] = -5.0
    return off


@torch.no_grad()
def set_per_image_block_policy(model: torch.nn.Module, images: torch.Tensor,
                               shares: float | list[tuple[float, float]], rounds: int = 3) -> None:
    """Random selector weights; each bias set so that a direction runs for its share of ``images``: one
    ``block_ratio`` for every (layer, direction), or one (forward, backward) pair per layer, e.g. what a
    trained model's selectors chose (recalibrated ``rounds`` times, since upstream skipping shifts downstream
    inputs). Layer 0 runs both directions for every image with a single share: its class-token row does not
    depend on the image."""
    # a selector's input is its layer's class-token in_proj row: the mixer's context gives the class token's
    # index, the in_proj output the rows (at inference the selectors' weights go to the mixer, not a call)
    cls_at: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        hooks.append(layer.mixer.register_forward_pre_hook(
            lambda mod, args, i=i: cls_at.__setitem__(i, args[1].cls_index)))
        hooks.append(layer.mixer.in_proj.register_forward_hook(
            lambda mod, inp, out, i=i: inputs.__setitem__(
                i, out[torch.arange(out.shape[0], device=out.device), cls_at[i]].float())))
    selectors = model.reducer.selectors
    if isinstance(shares, (int, float)):
        shares = [(float(shares), float(shares))] * len(selectors)
    if len(shares) != len(selectors):
        raise ValueError(f"{len(shares)} per-layer direction shares for a model of {len(selectors)} layers")
    gen = torch.Generator(device="cpu").manual_seed(1)
    for sel in selectors:
        sel.weight.copy_(torch.randn(sel.weight.shape, generator=gen) / sel.weight.shape[1] ** 0.5)
        sel.bias.fill_(5.0)
    for _ in range(rounds):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.is_cuda):
            model(images)
        for i, sel in enumerate(selectors):
            proj = inputs[i] @ sel.weight.float().t()
            share = torch.tensor(shares[i], dtype=proj.dtype, device=proj.device).clamp(0.0, 1.0)
            # ties at the threshold run (e.g. layer 0, whose class-token row is the same for every image: a
            # strict threshold at a quantile of equal values would switch that layer off for all of them)
            q = torch.stack([torch.quantile(proj[:, j], 1.0 - share[j]) for j in range(proj.shape[1])])
            bias = -q + 1e-4 * q.abs().clamp_min(1e-3)
            # a share of 0 or 1: every image the same way, with a margin
            bias = torch.where(share >= 1.0, torch.full_like(bias, 5.0) - proj.min(0).values, bias)
            bias = torch.where(share <= 0.0, torch.full_like(bias, -5.0) - proj.max(0).values, bias)
            sel.bias.copy_(bias)
    for h in hooks:
        h.remove()


def load_direction_shares(path: str, depth: int) -> dict[str, Any]:
    """Per-layer (forward, backward) shares of images running each scan, read from a ``dyvm_cifar10.py`` result
    or a plain ``{layer: [forward, backward]}`` map, stretched to ``depth`` layers."""
    with open(path) as f:
        data = json.load(f)
    rates = data.get("dyvm", {}).get("direction_rates") if isinstance(data.get("dyvm"), dict) else data
    if not isinstance(rates, dict) or not rates:
        raise SystemExit(f"{path}: no per-layer direction shares (a dyvm_cifar10.py result's dyvm.direction_rates "
                         "or a {layer: [forward, backward]} map)")
    try:
        src = [tuple(float(x) for x in rates[k]) for k in sorted(rates, key=int)]
    except (TypeError, ValueError) as err:
        raise SystemExit(f"{path}: direction shares must map layer numbers to [forward, backward]: {err}")
    if any(len(pair) != 2 or not all(0.0 <= x <= 1.0 for x in pair) for pair in src):
        raise SystemExit(f"{path}: every layer needs two shares in [0, 1]")
    shares = [src[i * len(src) // depth] for i in range(depth)]
    return {"source": path, "source_depth": len(src), "shares": shares}


def flops_of(model: torch.nn.Module, img_size: int, block_ratio: float | None = None) -> dict[str, float]:
    """GFLOPs (paper and full conventions) of the model's last counted forward (``dyvm.count_flops``: the
    directions its selectors ran, or every layer at ``block_ratio``)."""
    report = dyvm.count_flops(model, img_size, block_ratio=block_ratio)
    return {"paper": report.gflops("paper"), "full": report.gflops("full")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vim_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--keep-ratio", type=float, default=0.7)
    parser.add_argument("--block-ratio", type=float, default=0.8)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=10, help="forwards per timing round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--train-iters", type=int, default=10, help="0 skips the training-step measurement")
    parser.add_argument("--direction-shares", default=None, metavar="JSON",
                        help="add a per-image row whose selectors run each (layer, direction) for the share of "
                             "images a trained model's did: a dyvm_cifar10.py result (its dyvm.direction_rates) "
                             "or a {layer: [forward, backward]} map; a shallower profile is stretched over the "
                             "depth (layer i takes profile layer i * profile depth // depth)")
    parser.add_argument("--unfused-prune-steps", action="store_true",
                        help="also time each token-pruning DyVM row with the fused pruning steps off (PyTorch's "
                             "row gather, add + LayerNorm and keep-predictor head; CUDA graph rows)")
    parser.add_argument("--pytorch-keep-head", action="store_true",
                        help="also time each token-pruning DyVM row with only the fused keep-predictor head off "
                             "(CUDA graph rows)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dyvm_speed.py measures GPU speed: no CUDA device found")
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda")
    torch.manual_seed(0)
    dense = create_model(args.model).to(dev).eval()
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=dev)

    def variant(keep: float | None, block: float | None) -> tuple[torch.nn.Module, list[tuple[int, int]]]:
        model = dyvm.apply(copy.deepcopy(dense), keep_ratio=keep, block_ratio=block)
        off = set_static_block_policy(model, block) if block is not None else []
        return dyvm.deploy(model), off

    models: dict[str, torch.nn.Module] = {"dense": dense}
    off_pairs: dict[str, list[tuple[int, int]]] = {}
    for name, keep, block in (("dyvm tokens only", args.keep_ratio, None),
                              ("dyvm blocks only", None, args.block_ratio),
                              ("dyvm tokens + blocks", args.keep_ratio, args.block_ratio)):
        models[name], off_pairs[name] = variant(keep, block)
    def per_image_variant(shares: float | list[tuple[float, float]]) -> torch.nn.Module:
        model = dyvm.deploy(dyvm.apply(copy.deepcopy(dense), keep_ratio=args.keep_ratio,
                                       block_ratio=args.block_ratio))
        set_per_image_block_policy(model, images, shares)
        return model

    models["dyvm tokens + blocks, per-image policy"] = per_image_variant(args.block_ratio)
    profile = None
    if args.direction_shares:
        profile = load_direction_shares(args.direction_shares, len(dense.layers))
        models["dyvm tokens + blocks, trained selectors' per-layer shares"] = per_image_variant(profile["shares"])

    def forward_fn(model: torch.nn.Module) -> Callable[[], object]:
        def forward() -> object:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model(images)
        return forward

    # CUDA graphs remove the per-kernel launch cost (which hides work saved on the GPU at this size): token
    # pruning has static shapes and direction skipping happens inside the kernels, so every path is captured.
    for name in list(models):
        models[f"{name} (CUDA graph)"] = models[name]
        prunes = name.startswith("dyvm") and "blocks only" not in name
        for wanted, suffix in ((args.unfused_prune_steps, UNFUSED), (args.pytorch_keep_head, PYTORCH_HEAD)):
            if wanted and prunes:
                models[f"{name}{suffix} (CUDA graph)"] = models[name]
    graphs = {}
    for name in models:
        if "graph" in name:
            with fused_prune_steps(UNFUSED not in name, UNFUSED not in name and PYTORCH_HEAD not in name):
                graphs[name] = capture_graph(forward_fn(models[name]))

    stats: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        for _ in range(args.warmup):
            (graphs[name] if name in graphs else forward_fn(model))()
        stats[name] = {"tokens_per_layer": [m.last_stats.get("tokens") for m in _mixers(model)],
                       "block_ratio": dyvm.realised_block_ratio(model) or 1.0}
    torch.cuda.synchronize()
    runners = {name: graphs[name] if name in graphs else forward_fn(model) for name, model in models.items()}
    samples = {name: [args.batch_size / ms * 1000.0 for ms in times]
               for name, times in interleaved_times_ms(runners, args.rounds, args.iters, dev).items()}

    dense_ips = {name: statistics.median(samples["dense (CUDA graph)" if "graph" in name else "dense"])
                 for name in models}
    dense_flops = flops_of(dense, args.img_size)
    rows = []
    for name, model in models.items():
        ips = statistics.median(samples[name])
        # the directions realised on the benchmark images (static policy: the same for any image)
        flops = flops_of(model, args.img_size, None if stats[name]["block_ratio"] == 1.0 else
                         stats[name]["block_ratio"])
        ratio = {k: dense_flops[k] / flops[k] for k in flops}
        speedup = ips / dense_ips[name]
        rows.append(dict(
            config=name, images_per_s=round(ips, 1), images_per_s_rounds=[round(v, 1) for v in samples[name]],
            speedup=round(speedup, 3), tokens_per_layer=stats[name]["tokens_per_layer"],
            realised_block_ratio=round(stats[name]["block_ratio"], 4), directions_off=off_pairs.get(name, []),
            gflops={k: round(v, 3) for k, v in flops.items()},
            flops_ratio={k: round(v, 3) for k, v in ratio.items()},
            speedup_over_flops_ratio=round(speedup / ratio["paper"], 3),
            speedup_over_flops_ratio_full=round(speedup / ratio["full"], 3)))
    train = train_step_speed(dense, args) if args.train_iters > 0 else None
    result = dict(
        benchmark="dyvm_speed", model=args.model, img_size=args.img_size, batch_size=args.batch_size,
        dtype="bf16 autocast", keep_ratio=args.keep_ratio, block_ratio_target=args.block_ratio,
        scan_backend=get_backend("cuda"), device=torch.cuda.get_device_name(), torch=torch.__version__,
        python=platform.python_version(), warmup=args.warmup, iters_per_round=args.iters, rounds=args.rounds,
        train_step=train, direction_shares=profile, scan_kernel=scan_kernel_settings(),
        note="random weights; block selection by a static policy (the same directions off for every image) or "
             "a per-image one (random selectors calibrated to the block ratio; images differ in what they skip)"
             + ("; and one calibrated to a trained model's per-layer shares (below)" if profile else ""),
        rows=rows)
    write_result(args.out, "dyvm_speed", result, markdown(result))
    print(markdown(result))
    return 0


def train_step_speed(dense: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of one DyVM fine-tuning step: frozen dense teacher forward + student forward (Gumbel decisions,
    rearranged + masked full-length sequences, both directions gated) + DyVM losses + backward + AdamW."""
    student = dyvm.apply(copy.deepcopy(dense), keep_ratio=args.keep_ratio, block_ratio=args.block_ratio).train()
    teacher = dense.eval()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    dev = next(student.parameters()).device
    x = torch.randn(args.train_batch_size, 3, args.img_size, args.img_size, device=dev)
    y = torch.randint(0, student.num_classes, (args.train_batch_size,), device=dev)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                t_state = teacher.forward_tokens(x)
                t_logits = teacher.head(t_state.hidden[torch.arange(x.shape[0], device=dev), t_state.cls_index])
            state = student.forward_tokens(x)
            logits = student.head(state.hidden[torch.arange(x.shape[0], device=dev), state.cls_index])
            kl = torch.nn.functional.kl_div(logits.float().log_softmax(-1), t_logits.float().log_softmax(-1),
                                            reduction="batchmean", log_target=True)
            loss = torch.nn.functional.cross_entropy(logits.float(), y) + 0.5 * kl
            loss = loss + sum(student.reducer.extra_losses(state, t_state).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    ms = mean_time_ms(step, args.train_iters, dev)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return dict(batch_size=args.train_batch_size, images_per_s=round(args.train_batch_size / ms * 1000.0, 1),
                peak_memory_gib=round(peak, 2), iters=args.train_iters)


def scan_kernel_settings() -> dict[str, int]:
    """The Triton forward scan's launch settings this run used (channels per program, warps)."""
    return dict(block_d=policy.get("scan_fwd_block_d"), warps=policy.get("scan_fwd_warps"))


def _kernel_words(k: dict[str, int]) -> str:
    return f"pair scan kernel, programs of {k['block_d']} channels x {k['warps']} warp(s)"


def _mixers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mixer for layer in model.layers]


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# DyVM speed: {result['model']} at {result['img_size']}, batch {result['batch_size']}, "
        f"{result['dtype']}, {result['device']}",
        "",
        f"rho = {result['keep_ratio']}, block-ratio target {result['block_ratio_target']}; scan backend "
        f"`{result['scan_backend']}` ({_kernel_words(result['scan_kernel'])}); torch {result['torch']}; "
        f"median of {result['rounds']} interleaved rounds x "
        f"{result['iters_per_round']} forwards. {result['note']}.",
        "",
        "| config | img/s | speedup | GFLOPs (paper) | GFLOPs (full) | FLOPs ratio paper / full "
        "| speedup / FLOPs ratio paper / full | executed directions | tokens per stage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        g, fr = r["gflops"], r["flops_ratio"]
        stages = sorted(set(r["tokens_per_layer"]), reverse=True)
        lines.append(
            f"| {r['config']} | {r['images_per_s']:.0f} | {r['speedup']:.3f}x | {g['paper']:.3f} | {g['full']:.3f} | "
            f"{fr['paper']:.3f} / {fr['full']:.3f} | {r['speedup_over_flops_ratio']:.3f} / "
            f"{r['speedup_over_flops_ratio_full']:.3f} | {r['realised_block_ratio']:.3f} | "
            f"{'/'.join(str(t) for t in stages)} |")
    if result.get("direction_shares"):
        d = result["direction_shares"]
        lines += ["", f"Trained selectors' shares: from `{d['source']}` ({d['source_depth']} layers, stretched over "
                      f"the depth), per layer forward / backward: "
                      + ", ".join(f"{f:.2f}/{b:.2f}" for f, b in d["shares"]) + "."]
    if result.get("train_step"):
        t = result["train_step"]
        lines += ["", f"DyVM fine-tuning step (teacher forward + student forward/backward + AdamW, bf16 autocast, "
                      f"batch {t['batch_size']}): {t['images_per_s']:.0f} img/s, peak memory "
                      f"{t['peak_memory_gib']} GiB."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
