"""The checkpoint loader: wrappers, prefixes, safe unpickling, corrupt files, mismatches, pos_embed resizing."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

import mambatrim
from mambatrim.models import CheckpointError, CheckpointMismatchError, load_checkpoint
from mambatrim.models.pos_embed import split_middle_cls


def tiny(**overrides):
    kwargs = dict(depth=2, embed_dim=32, num_classes=10, img_size=32, drop_path_rate=0.0)
    return mambatrim.create_model("vim_tiny_patch16_224", **{**kwargs, **overrides})


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("wrap", ["raw", "model", "model_ema", "module_prefix", "model_module_prefix"])
def test_loads_every_wrapping(tmp_path, wrap):
    src = tiny()
    sd = src.state_dict()
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    obj = {"raw": sd, "model": {"model": sd, "epoch": 3}, "model_ema": {"model_ema": sd},
           "module_prefix": prefixed, "model_module_prefix": {"model": prefixed}}[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    dst = tiny()
    load_checkpoint(dst, path)
    assert_same_weights(src, dst)
    dst2 = tiny()
    load_checkpoint(dst2, obj)  # an in-memory dict works the same
    assert_same_weights(src, dst2)


def test_official_file_layout_with_argparse_namespace(tmp_path):
    src = tiny()
    path = tmp_path / "official.pth"
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=1e-3, model="vim_tiny"), "epoch": 299},
               path)
    dst = tiny()
    load_checkpoint(dst, path)
    assert_same_weights(src, dst)


class Payload:
    """Unpickling this would run code: the loader must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_arbitrary_pickled_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny().state_dict(), "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="not allowed to be unpickled"):
        load_checkpoint(tiny(), path)
    assert "unpickled!" not in capsys.readouterr().out


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": tiny().state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint \(or corrupt\)"):
        load_checkpoint(tiny(), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tiny(), tmp_path / "nope.pth")


def test_other_config_is_refused_naming_keys_and_shapes(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save({"model": tiny(embed_dim=48).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(tiny(), path)
    msg = str(err.value)
    assert "layers.0.mixer.in_proj.weight: checkpoint (192, 48) vs model (128, 32)" in msg
    assert "shape mismatches" in msg
    torch.save({"model": tiny(depth=3).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in the checkpoint: layers\.2\."):
        load_checkpoint(tiny(), path)


def test_pos_embed_resize_to_384_keeps_class_slot_and_runs():
    src = mambatrim.create_model("vim_tiny_patch16_224", depth=1, embed_dim=32, drop_path_rate=0.0)
    dst = mambatrim.create_model("vim_tiny_patch16_224", depth=1, embed_dim=32, drop_path_rate=0.0, img_size=384)
    report = load_checkpoint(dst, {"model": src.state_dict()})
    assert report.resized == ["pos_embed (1, 197, 32) -> (1, 577, 32)"]
    old, new = src.pos_embed.detach(), dst.pos_embed.detach()
    assert torch.equal(new[:, 288], old[:, 98])  # class slot at M//2 in both: copied exactly
    # patch slots: bicubic resampling of the 14x14 grid WITHOUT the class slot (independent computation)
    patches = torch.cat([old[:, :98], old[:, 99:]], 1).reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    expect = F.interpolate(patches, size=(24, 24), mode="bicubic", align_corners=False)
    expect = expect.permute(0, 2, 3, 1).reshape(1, 576, 32)
    torch.testing.assert_close(split_middle_cls(new)[1], expect)
    with torch.no_grad():
        assert dst.eval()(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_head_can_be_skipped_for_fine_tuning():
    src = tiny(num_classes=1000)
    dst = tiny(num_classes=10)
    with pytest.raises(CheckpointMismatchError, match="head.weight"):
        load_checkpoint(dst, src.state_dict())
    report = load_checkpoint(dst, src.state_dict(), skip_mismatched_head=True)
    assert report.skipped == ["head.weight (1000, 32)", "head.bias (1000,)"]


def test_official_configs_do_not_cross_load():
    with torch.device("meta"):
        tiny_sd = mambatrim.create_model("vim_tiny_patch16_224").state_dict()
        small = mambatrim.create_model("vim_small_patch16_224")
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(small, {"model": tiny_sd})
    assert "layers.0.mixer.in_proj.weight: checkpoint (768, 192) vs model (1536, 384)" in str(err.value)
    assert "and " in str(err.value) and "more" in str(err.value)  # long lists are summarised, not dropped silently
