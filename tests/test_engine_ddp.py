"""Two gloo processes under torchrun give the same step as one process with the same global batch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

from mambatrim.engine.config import make_config
from mambatrim.engine.train import train
from mambatrim.models.checkpoint import read_checkpoint

ARGS = ["--model-opt", "embed_dim=16", "--model-opt", "depth=2", "--model-opt", "patch_size=4", "--model-opt",
        "stride=4", "--input-size", "8", "--in-chans", "1", "--epochs", "1", "--stop-after-steps", "2",
        "--drop-path", "0", "--mixup", "0", "--cutmix", "0", "--smoothing", "0", "--warmup-epochs", "0",
        "--unscale-lr", "--lr", "1e-3", "--num-workers", "0", "--device", "cpu", "--no-progress",
        "--set", "gpu_aug_pad=0", "--set", "gpu_aug_flip=false", "--set", "mean=[0.5]", "--set", "std=[0.5]"]


def _losses(path):
    import json

    return [json.loads(line)["loss"] for line in open(path) if '"train"' in line]


def test_two_process_gloo_step_equals_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mambatrim", "train", *ARGS, "--batch-size", "32", "--output-dir", str(tmp_path / "ddp")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers: leave nothing behind
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert "2 process(es)" in stdout

    torch.set_num_threads(1)
    from mambatrim.cli import build_parser
    from mambatrim.commands.train import config_from_args

    args = build_parser().parse_args(["train", *ARGS, "--batch-size", "64", "--output-dir", str(tmp_path / "one")])
    train(config_from_args(args))
    ddp = read_checkpoint(tmp_path / "ddp" / "last.pth")
    one = read_checkpoint(tmp_path / "one" / "last.pth")
    assert ddp["world_size"] == 2 and ddp["global_step"] == one["global_step"] == 2
    assert len(ddp["rng"]) == 2  # every rank's RNG state is kept for an exact resume
    for key, value in one["model"].items():
        assert torch.allclose(ddp["model"][key], value, atol=1e-6, rtol=1e-5), key
    # logged loss: mean over both ranks' micro-batches == the single process's loss on the same 64 images
    ddp_loss, one_loss = _losses(tmp_path / "ddp" / "metrics.jsonl"), _losses(tmp_path / "one" / "metrics.jsonl")
    assert len(ddp_loss) == len(one_loss) >= 1
    assert abs(ddp_loss[-1] - one_loss[-1]) < 1e-5
