"""Training-step cost on one GPU: images/s of the engine's step, and where its time goes.

For each configuration (dense fine-tune, R-MeeTo re-training with the frozen dense teacher, DyVM fine-tuning
with the teacher) one step is exactly what ``mambatrim train`` runs: the engine's ``StudentForward`` and
``TrainingLoss`` (classification + 0.5 KL to the teacher + the method's own terms) under bf16 autocast, the
backward, and the engine's AdamW. By default, as in the engine, the student's forward+backward and the
teacher's forward are replayed from CUDA graphs; rows marked ``eager`` run them as plain launches. Reported:
images/s (mean over ``--iters`` back-to-back steps), the GPU-minutes 3 ImageNet-1K epochs would take at that
rate (data loading excluded), and, under ``torch.profiler``, the summed CUDA kernel time of one step by op --
against the wall time it shows how much of the step the GPU is busy (the rest is host overhead: launches,
Python); kernels replayed from a graph may be missing from the profile, so that share is meaningful for the
eager rows. Random weights and inputs.

    python benchmarks/train_profile.py --out benchmarks/results
    python benchmarks/train_profile.py --model plainmamba_l1 --model-opt depth=12 --model-opt patch_size=2 \
        --model-opt num_classes=10 --img-size 32 --batch-size 256 --configs "dense_finetune, eager" \
        "dense_finetune, eager, indexing backward" dense_finetune "dense_finetune, indexing backward" \
        --stem train_profile_plainmamba

(the second: the CIFAR-10 protocol's PlainMamba step, with the direction terms' gradient summed by PyTorch's
indexing backward as before :func:`mambatrim.ops.table_lookup.lookup_rows`, against the default).
Writes ``<stem>.json`` / ``<stem>.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import copy
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import mambatrim  # noqa: F401  (registers the models)
from mambatrim.engine.benchmark import mean_time_ms
from mambatrim.engine.cuda_graph import GraphedStudent
from mambatrim.engine.losses import LossWeights, StudentForward, TrainingLoss
from mambatrim.engine.optim import build_optimizer
from mambatrim.engine.report import write_result
from mambatrim.models.registry import create_model
from mambatrim.ops import policy
from mambatrim.reduce import apply_method
from mambatrim.reduce.registry import parse_method_options

IMAGENET_TRAIN_IMAGES = 1_281_167
RMEETO = dict(method="rmeeto", opts={"ratio": 0.31}, teacher=True)
DYVM = dict(method="dyvm", opts={"keep_ratio": 0.7, "block_ratio": 0.8}, teacher=True)
# step_graph: the engine's default (GraphedStudent); teacher_graph: the teacher's forward graphed (default)
CONFIGS: dict[str, dict[str, Any]] = {
    "dense_finetune, eager": dict(method=None, opts={}, teacher=False, step_graph=False),
    "dense_finetune": dict(method=None, opts={}, teacher=False),
    "rmeeto_0.31_kd, eager step and teacher": dict(RMEETO, step_graph=False, teacher_graph=False),
    "rmeeto_0.31_kd, eager step, compiled merge": dict(RMEETO, opts={"ratio": 0.31, "compile": True},
                                                        step_graph=False),
    "rmeeto_0.31_kd": RMEETO,
    "dyvm_0.7_0.8_kd, eager": dict(DYVM, step_graph=False, teacher_graph=False),
    "dyvm_0.7_0.8_kd": DYVM,
    # fast-path settings changed for one row only (mambatrim.ops.policy)
    "dense_finetune, indexing backward": dict(method=None, opts={}, teacher=False,
                                              policy={"table_lookup_grad": "index"}),
    "dense_finetune, eager, indexing backward": dict(method=None, opts={}, teacher=False, step_graph=False,
                                                     policy={"table_lookup_grad": "index"}),
}


def build_step(name: str, model_name: str, bsz: int, img_size: int,
               model_opts: dict[str, Any]) -> tuple[Any, torch.nn.Module]:
    spec = CONFIGS[name]
    torch.manual_seed(0)
    student = create_model(model_name, **model_opts).cuda()
    teacher = copy.deepcopy(student).eval().requires_grad_(False) if spec["teacher"] else None
    if spec["method"]:
        apply_method(student, spec["method"], **spec["opts"])
    student.train()
    forward = StudentForward(student)
    if spec.get("step_graph", True):
        forward = GraphedStudent(forward, student, torch.bfloat16)
    loss_fn = TrainingLoss(torch.nn.CrossEntropyLoss(), LossWeights(distill=0.5), teacher,
                           cuda_graph=spec.get("teacher_graph", True), autocast_dtype=torch.bfloat16)
    optimizer = build_optimizer(student, 1e-5, 0.05, ["1d", "bias", "model"])
    images = torch.randn(bsz, 3, img_size, img_size, device="cuda")
    labels = torch.randint(0, student.num_classes, (bsz,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, state = forward(images)
            loss, _ = loss_fn(student, images, logits, state, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, forward


# CUPTI records that come with a duration but are no kernel ("Command Buffer Full": the host waited for room to
# queue work, seen at a graph replay; 1.8 s against a 0.23 s step, counted as kernel time before this filter)
NOT_KERNELS = {"Command Buffer Full"}


def kernel_ms_by_op(step: Any, reps: int = 3) -> dict[str, float]:
    """Kernel ms per step by launching op (each kernel counted once, at the op that launched it)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    by_op: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.name in NOT_KERNELS:
            continue
        kernels = getattr(e, "kernels", None) or []
        dur = sum(k.duration for k in kernels)
        if dur:
            by_op[e.name] += dur / 1000.0 / reps
    return dict(by_op)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vim_small_patch16_224")
    parser.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="model constructor option (repeatable), e.g. depth=12")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default="train_profile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_profile.py measures GPU training steps: no CUDA device found")
    model_opts = parse_method_options(args.model_opt)
    if "img_size" in model_opts:
        raise SystemExit("train_profile.py: give the input size with --img-size, not --model-opt img_size=...")
    model_opts["img_size"] = args.img_size
    rows: dict[str, Any] = {}
    for name in args.configs:
        torch.cuda.reset_peak_memory_stats()  # peak over the whole run: warm-up and graph capture included
        with policy.override(**CONFIGS[name].get("policy", {})):
            step, forward = build_step(name, args.model, args.batch_size, args.img_size, model_opts)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            ms = mean_time_ms(step, args.iters, torch.device("cuda"))
            ops = kernel_ms_by_op(step)
        busy = sum(ops.values())
        ips = args.batch_size / ms * 1000.0
        graphed = getattr(forward, "failed", "off")
        rows[name] = dict(step_ms=round(ms, 2), images_per_s=round(ips, 1),
                          step_cuda_graph=graphed if graphed else True,
                          gpu_minutes_3_imagenet_epochs=round(3 * IMAGENET_TRAIN_IMAGES / ips / 60.0, 1),
                          kernel_ms=round(busy, 2), gpu_busy_share=round(busy / ms, 3),
                          peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                          top_ops={k: round(v, 3) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:15]})
        print(name, {k: v for k, v in rows[name].items() if k != "top_ops"}, flush=True)
        del step, forward
        torch.cuda.empty_cache()
    import triton

    result = dict(model=args.model, model_options=model_opts, batch_size=args.batch_size, precision="bf16 autocast",
                  policies={n: CONFIGS[n].get("policy", {}) for n in args.configs},
                  device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  rows=rows)
    write_result(args.out, args.stem, result, markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The result's tables: one row a step configuration, then each one's costliest ops."""
    rows = result["rows"]
    options = ", ".join(f"{k}={v}" for k, v in result["model_options"].items())
    lines = [f"# Training-step cost: {result['model']} ({options}), batch {result['batch_size']}, bf16 autocast", "",
             f"{result['device']}; torch {result['torch']}, triton {result['triton']}. The engine's step "
             "(StudentForward + TrainingLoss + backward + AdamW); teacher = frozen dense model; data loading "
             "excluded. Rows without `eager` replay the student's forward+backward and the teacher's forward "
             "from CUDA graphs (the engine's default). `GPU busy` = profiled kernel time / wall time of a step "
             "(graph-replayed kernels may be missing from the profile). Fast-path settings changed for a row only: "
             + (", ".join(f"{n}: {p}" for n, p in result["policies"].items() if p) or "none") + ".", "",
             "| step | img/s | ms/step | kernel ms (profiled) | GPU busy | GPU-minutes, 3 ImageNet epochs | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | {r['kernel_ms']:.1f} | "
                     f"{100 * r['gpu_busy_share']:.0f} % | {r['gpu_minutes_3_imagenet_epochs']:.1f} | "
                     f"{r['peak_memory_gib']:.1f} |")
    for name, r in rows.items():
        lines += ["", f"Costliest ops, {name} (kernel ms per step):", "", "| op | ms |", "|---|---|"]
        lines += [f"| `{op[:70]}` | {v:.3f} |" for op, v in list(r["top_ops"].items())[:10]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
