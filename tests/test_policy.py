"""The fast-path policy: validation, scoped overrides, environment overrides, and that the code reads it."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mambatrim.ops import get_backend, policy, use_backend


def test_unknown_setting_and_bad_values_name_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="valid settings: backend, fused_mixer"):
        policy.set(fused_row_gaher=False)
    with pytest.raises(ValueError, match="one of auto, ref, torch, triton"):
        policy.set(backend="cuda")
    with pytest.raises(ValueError, match="positive integer"):
        policy.set(scan_fwd_block_d=0)
    with pytest.raises(ValueError, match="True or False"):
        policy.set(fused_merge="yes")


def test_override_is_scoped_and_restored_after_an_error() -> None:
    before = policy.current()
    with pytest.raises(RuntimeError):
        with policy.override(fused_row_gather=False, backend="ref"):
            assert policy.get("fused_row_gather") is False
            assert get_backend("cuda") == "ref"
            raise RuntimeError("boom")
    assert policy.current() == before
    with use_backend("ref"):  # the older API is the same setting
        assert policy.get("backend") == "ref"
    assert policy.current() == before


def test_environment_overrides_are_read_at_import() -> None:
    code = ("from mambatrim.ops import policy, get_backend;"
            "print(policy.get('fused_row_gather'), policy.get('scan_fwd_block_d'), get_backend('cuda'))")
    env = {"MAMBATRIM_FUSED_ROW_GATHER": "0", "MAMBATRIM_SCAN_FWD_BLOCK_D": "32", "MAMBATRIM_BACKEND": "ref",
           "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "32", "ref"]
    bad = subprocess.run([sys.executable, "-c", code], env={"MAMBATRIM_FUSED_MERGE": "maybe", "PATH": ""},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "MAMBATRIM_FUSED_MERGE='maybe'" in bad.stderr


def test_the_backend_setting_changes_which_scan_runs() -> None:
    from mambatrim.ops import scan_ref

    calls = []
    original = scan_ref.selective_scan_ref
    u = torch.randn(1, 2, 5)
    args = (u, torch.rand(1, 2, 5), -torch.rand(2, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    import mambatrim.ops as ops

    ops_ref = ops.selective_scan_ref
    try:
        ops.selective_scan_ref = lambda *a, **k: calls.append(1) or original(*a, **k)
        ops.selective_scan(*args)
        assert not calls  # 'torch' on the CPU by default
        with policy.override(backend="ref"):
            ops.selective_scan(*args)
        assert calls == [1]
    finally:
        ops.selective_scan_ref = ops_ref
