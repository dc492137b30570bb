"""DDP scaling check: training throughput and loss of 1 process vs N processes at the same global batch.

Runs ``torchrun --standalone --nproc_per_node=K -m mambatrim train`` on synthetic data for each K, with the
same global batch (per-process batch = global / K), no augmentation and no dropout, so the first steps see the
same images and the loss curves must agree up to float reduction order. Writes ``ddp_scaling.json`` and
``ddp_scaling.md`` into ``--out``.

    python benchmarks/ddp_scaling.py --nproc 8 --device cuda                     # one 8-GPU node
    python benchmarks/ddp_scaling.py --nproc 2 --device cpu --tiny --out /tmp    # CPU/gloo smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mambatrim.engine.report import write_result

TINY = ["--model-opt", "embed_dim=16", "--model-opt", "depth=2", "--model-opt", "patch_size=4",
        "--model-opt", "stride=4", "--input-size", "8"]
CIFAR_LIKE = ["--model-opt", "depth=12", "--model-opt", "patch_size=2", "--model-opt", "stride=2",
              "--input-size", "32"]


def run_one(nproc: int, args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / f"n{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mambatrim", "train", *(TINY if args.tiny else CIFAR_LIKE),
           "--data-path", f"synthetic:{args.images}", "--batch-size", str(args.global_batch // nproc),
           "--epochs", "1", "--stop-after-steps", str(args.steps), "--drop-path", "0", "--mixup", "0",
           "--cutmix", "0", "--smoothing", "0", "--warmup-epochs", "0", "--unscale-lr", "--lr", "1e-3",
           "--num-workers", "0", "--device", args.device, "--no-progress", "--output-dir", str(out),
           "--set", "gpu_aug_pad=0", "--set", "gpu_aug_flip=false"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"torchrun with {nproc} process(es) failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    summary = json.loads((out / "summary.json").read_text())
    return {"nproc": nproc, "wall_s": time.time() - t0, "train_img_per_s": summary["train_img_per_s"],
            "losses": [(r["step"], r["loss"]) for r in train], "device": summary.get("device_name", args.device)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the scaled run (GPUs on CUDA)")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=8192, help="synthetic training images")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.global_batch % args.nproc:
        raise SystemExit("--global-batch must be divisible by --nproc")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_one(1, args, Path(tmp)), run_one(args.nproc, args, Path(tmp))]
    single, scaled = runs
    common = dict(single["losses"]).keys() & dict(scaled["losses"]).keys()
    diffs = [abs(dict(single["losses"])[s] - dict(scaled["losses"])[s]) for s in sorted(common)]
    result = {"global_batch": args.global_batch, "steps": args.steps, "device": args.device, "runs": runs,
              "speedup": scaled["train_img_per_s"] / single["train_img_per_s"],
              "scaling_efficiency": scaled["train_img_per_s"] / single["train_img_per_s"] / args.nproc,
              "max_abs_loss_diff": max(diffs) if diffs else None}
    lines = ["| processes | train img/s | final loss |", "|---|---|---|"]
    lines += [f"| {r['nproc']} | {r['train_img_per_s']:.0f} | {r['losses'][-1][1]:.4f} |" for r in runs]
    lines += ["", f"speed-up {result['speedup']:.2f}x ({100 * result['scaling_efficiency']:.0f}% efficiency), "
                  f"max |loss difference| over logged steps {result['max_abs_loss_diff']:.2e}"]
    write_result(args.out, "ddp_scaling", result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
