"""Training engine: exact resume, atomic checkpoints, accumulation, weight-decay groups, distillation checks."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mambatrim.engine.checkpointing import atomic_save
from mambatrim.engine.config import make_config
from mambatrim.engine.losses import check_teacher, kl_teacher_student, token_mse
from mambatrim.engine.optim import exempt_names
from mambatrim.engine.train import train
from mambatrim.models import CheckpointError, CheckpointMismatchError, create_model
from mambatrim.models.checkpoint import read_checkpoint
from mambatrim.reduce import TokenState

# 8x8 digits, 4x4 patches (4 tokens + class token), width 16, depth 2: a step costs milliseconds.
TINY = dict(model="vim_tiny_patch16_224", model_kwargs={"embed_dim": 16, "depth": 2, "patch_size": 4, "stride": 4},
            data_path="digits", input_size=8, in_chans=1, batch_size=128, epochs=2, lr=1e-3, unscale_lr=True,
            warmup_epochs=0.5, drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1, gpu_aug_pad=1,
            gpu_aug_flip=True, num_workers=0, progress=False, device="cpu", mean=(0.5,), std=(0.5,))


def _cfg(tmp: Path, **over):
    return make_config(TINY, {"output_dir": str(tmp)}, over)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_mid_epoch_equals_uninterrupted(tmp_path):
    # drop path (torch RNG), mixup/cutmix (numpy RNG), crop/flip (torch RNG) all in play
    full = train(_cfg(tmp_path / "full"))
    part = train(_cfg(tmp_path / "part", stop_after_steps=14))  # 11 steps per epoch: stops inside epoch 1
    assert part["stopped_early"] and part["global_step"] == 14
    ckpt = read_checkpoint(tmp_path / "part" / "last.pth")
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 3)
    resumed = train(_cfg(tmp_path / "part", resume="auto"))
    assert resumed["global_step"] == full["global_step"] == 22
    a, b = _weights(tmp_path / "full" / "last.pth"), _weights(tmp_path / "part" / "last.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["top1"] == full["top1"]


def test_corrupt_checkpoint_clear_error_and_previous_kept(tmp_path, monkeypatch):
    train(_cfg(tmp_path / "run", epochs=1, stop_after_steps=2))
    last = tmp_path / "run" / "last.pth"
    good = read_checkpoint(last)
    # a crash while writing the next checkpoint leaves the previous one intact and no temp file behind
    real_save = torch.save

    def crash(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"model": {}}, last)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in last.parent.iterdir() if p.suffix == ".tmp") == []
    assert torch.equal(read_checkpoint(last)["model"]["pos_embed"], good["model"]["pos_embed"])
    # a truncated file: a clear error before any training starts
    broken = tmp_path / "broken.pth"
    data = last.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint \(or corrupt\)"):
        train(_cfg(tmp_path / "run2", resume=str(broken)))
    assert not (tmp_path / "run2").exists()


def test_gradient_accumulation_equals_large_batch(tmp_path):
    common = dict(epochs=1, stop_after_steps=1, drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, gpu_aug_pad=0,
                  gpu_aug_flip=False, warmup_epochs=0)
    train(_cfg(tmp_path / "big", batch_size=128, **common))
    train(_cfg(tmp_path / "acc", batch_size=64, accum_steps=2, **common))
    a, b = _weights(tmp_path / "big" / "last.pth"), _weights(tmp_path / "acc" / "last.pth")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key
    start = create_model("vim_tiny_patch16_224", embed_dim=16, depth=2, patch_size=4, stride=4, img_size=8,
                         channels=1, num_classes=10)
    assert not torch.allclose(a["head.weight"], start.head.weight)  # (the step did change the weights)


def test_weight_decay_groups_default_is_official():
    model = create_model("vim_tiny_patch16_224", embed_dim=16, depth=1, img_size=32)
    exempt = set(exempt_names(model, ["1d", "bias", "model"]))
    assert {"pos_embed", "cls_token", "layers.0.mixer.D", "layers.0.mixer.D_b", "layers.0.norm.weight",
            "norm_f.weight", "head.bias", "layers.0.mixer.dt_proj.bias"} <= exempt
    assert "layers.0.mixer.A_log" not in exempt and "layers.0.mixer.in_proj.weight" not in exempt
    assert {"layers.0.mixer.A_log", "layers.0.mixer.A_b_log"} <= set(exempt_names(model, ["A_log"]))
    assert exempt_names(model, []) == []


def test_distillation_terms_against_manual_formulas():
    torch.manual_seed(0)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    p_t = F.softmax(t / 2, -1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(kl_teacher_student(s, t, 2.0), manual, atol=1e-6)
    teacher = torch.randn(2, 6, 3)
    positions = torch.tensor([[0, 2, 3, 5], [1, 3, 4, 5]])
    protected = torch.tensor([[1], [2]])
    student = teacher.gather(1, positions[..., None].expand(-1, -1, 3)).clone()
    state = TokenState(student, None, positions, protected)
    t_state = TokenState(teacher, None, torch.arange(6).expand(2, 6), torch.tensor([[3], [3]]))
    assert token_mse(state, t_state) == 0
    state.hidden[0, 0] += 1.0  # a patch token: counted; (1^2 per dim) / 6 patch tokens
    state.hidden[0, 1] += 5.0  # the class token: ignored
    assert torch.allclose(token_mse(state, t_state), torch.tensor(1.0 / 6))


def test_mismatched_teacher_is_refused(tmp_path):
    student = create_model("vim_tiny_patch16_224", embed_dim=16, depth=2, patch_size=4, stride=4, img_size=8,
                           channels=1, num_classes=10)
    other = create_model("vim_tiny_patch16_224", embed_dim=16, depth=2, patch_size=4, stride=4, img_size=8,
                         channels=1, num_classes=5)
    with pytest.raises(ValueError, match="teacher predicts 5 classes, the student 10"):
        check_teacher(student, other, token_distill=False)
    deeper = create_model("vim_tiny_patch16_224", embed_dim=16, depth=3, patch_size=4, stride=4, img_size=8,
                          channels=1, num_classes=10)
    atomic_save({"model": deeper.state_dict()}, tmp_path / "teacher.pth")
    with pytest.raises(CheckpointMismatchError, match="layers.2"):
        train(_cfg(tmp_path / "run", teacher=str(tmp_path / "teacher.pth")))


def test_sigterm_finishes_the_step_and_checkpoints(tmp_path, monkeypatch):
    import signal

    from mambatrim.engine import train as train_module

    real_step = train_module._Run.train_step

    def step_then_signal(self, batches):
        out = real_step(self, batches)
        if self.global_step == 3:
            signal.raise_signal(signal.SIGTERM)  # arrives mid-run, as from a scheduler
        return out

    monkeypatch.setattr(train_module._Run, "train_step", step_then_signal)
    summary = train(_cfg(tmp_path / "run", epochs=1))
    assert summary["stopped_early"] and summary["global_step"] == 3
    assert read_checkpoint(tmp_path / "run" / "last.pth")["global_step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed afterwards
