"""The comparison harness (mambatrim.engine.compare, ``mambatrim compare``): its result's shape, the dense row,
FLOPs from the project's counter, per-configuration policy, the YAML plans, and one-line errors."""
from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest
import torch

from mambatrim.analysis import count_flops
from mambatrim.cli import main
from mambatrim.engine import compare as harness
from mambatrim.models import create_model
from mambatrim.ops import policy
from mambatrim.reduce import apply_method

TINY = dict(depth=4, patch_size=8, stride=8)  # 32 px: 16 patch tokens + the class token
PLANS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "compare").glob("*.yaml"))
SEEN: list[tuple[str, int]] = []  # (reducer class or 'dense', scan_fwd_block_d) at each forward


def _recording_model(name: str, **kwargs):
    model = create_model(name, **kwargs)
    model.register_forward_pre_hook(lambda mod, args: SEEN.append(
        (type(mod.reducer).__name__ if mod.reducer is not None else "dense", policy.get("scan_fwd_block_d"))))
    return model


@pytest.fixture(scope="module")
def result() -> dict:
    configs = [harness.configuration(c) for c in (
        {"name": "norm, blocks of 16", "method": "prune_norm", "options": {"layers": [2], "keep": 0.5},
         "policy": {"scan_fwd_block_d": 16}},
        {"method": "prune_random", "options": {"layers": [2], "keep": 0.5}},
        {"name": "dyvm static", "method": "dyvm", "options": {"keep_ratio": None, "block_ratio": 0.8},
         "selectors": "static"})]
    SEEN.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "create_model", _recording_model)
        out = harness.compare("vim_tiny_patch16_224", configs, img_size=32, batch_size=2, dtype="fp32",
                              device="cpu", rounds=3, iters=1, warmup=1, model_kwargs=TINY)
    return json.loads(json.dumps(out))  # JSON-ready


def test_result_shape_and_the_dense_row(result: dict) -> None:
    assert [r["config"] for r in result["rows"]] == ["dense", "norm, blocks of 16",
                                                      "prune_random layers=[2] keep=0.5", "dyvm static"]
    assert result["modes"] == ["eager"] and result["rounds"] == 3
    env = result["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["policy"] == policy.current()
    assert env["date"] and "scan_backend" in env and "git_commit" in env and "triton" in env
    dense = result["rows"][0]
    assert dense["speedup"] == 1.0 and dense["speedup_spread"] == [1.0, 1.0] and dense["flops_ratio"] == 1.0
    for row in result["rows"]:
        assert len(row["img_per_s_rounds"]) == len(row["ms_rounds"]) == 3
        # speed-up = dense's median time over the configuration's; the spread, per-round ratios
        expect = statistics.median(dense["ms_rounds"]) / statistics.median(row["ms_rounds"])
        assert row["speedup"] == pytest.approx(expect, rel=1e-3)
        per_round = [d / t for d, t in zip(dense["ms_rounds"], row["ms_rounds"])]
        assert row["speedup_spread"] == pytest.approx([min(per_round), max(per_round)], rel=1e-3)
        assert row["speedup_spread"][0] <= row["speedup"] <= row["speedup_spread"][1]
        assert row["speedup_over_flops_ratio"] == pytest.approx(row["speedup"] / row["flops_ratio"], rel=1e-3)
    md = harness.to_markdown(result, "Tiny")
    assert md.startswith("# Tiny: vim_tiny_patch16_224 at 32 px") and md.count("\n| eager |") == 4


def test_flops_are_the_counters_and_dyvm_static_selectors_skip_their_share(result: dict) -> None:
    torch.manual_seed(0)
    dense = create_model("vim_tiny_patch16_224", img_size=32, **TINY).eval()
    pruned = apply_method(copy.deepcopy(dense), "prune_norm", layers=[2], keep=0.5)
    ratio = count_flops(dense).gflops("paper") / count_flops(pruned).gflops("paper")
    norm = result["rows"][1]
    assert norm["flops_ratio"] == pytest.approx(ratio, rel=1e-3)
    assert norm["tokens_per_layer"] == [17, 17, 9, 9]  # keep 0.5 of the 16 patch tokens from layer 2
    dyvm_row = result["rows"][3]
    n_off = round((1 - 0.8) * 2 * TINY["depth"])  # (layer, direction) pairs the static policy switches off
    assert len(dyvm_row["directions_off"]) == n_off
    assert dyvm_row["executed_directions"] == pytest.approx(1 - n_off / (2 * TINY["depth"]))


def test_a_policy_setting_holds_only_inside_its_configuration(result: dict) -> None:
    default = policy.SETTINGS["scan_fwd_block_d"].default
    by_model: dict[str, set[int]] = {}
    for owner, value in SEEN:
        by_model.setdefault(owner, set()).add(value)
    assert by_model.pop("dense") == {default}
    assert by_model == {"NormPruner": {16}, "RandomPruner": {default}, "DyVMReducer": {default}}
    assert policy.get("scan_fwd_block_d") == default  # restored after the run


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.stem)
def test_every_plan_loads_and_its_configurations_build(plan: Path) -> None:
    loaded = harness.load_plan(plan)
    assert loaded["stem"] and loaded["configs"]
    torch.manual_seed(0)
    dense = create_model(loaded["model"].replace("small", "tiny"), img_size=64).eval()  # 17 tokens
    images = torch.randn(2, 3, 64, 64)
    for cfg in loaded["configs"]:
        model, chosen = harness.build_variant(dense, cfg, images, None)
        assert (model.reducer is not None) == (cfg.method is not None) and not model.training  # dense rows: none
        if cfg.selectors == "static":
            assert chosen["directions_off"]


def _cli_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    code = main(["compare", "vim_tiny_patch16_224", "--device", "cpu", "--img-size", "32", "--batch-size", "1",
                 "--rounds", "1", "--iters", "1", "--warmup", "0", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_unknown_method_option_setting_or_key_is_a_one_line_error(capsys: pytest.CaptureFixture,
                                                                    tmp_path: Path) -> None:
    assert "known methods:" in _cli_error(capsys, "--method", "nosuch")
    assert "rati" in _cli_error(capsys, "--method", "rmeeto", "--method-opt", "rati=0.3")
    assert "valid settings:" in _cli_error(capsys, "--method", "rmeeto", "--policy", "fused_merj=false")
    plan = tmp_path / "p.yaml"
    plan.write_text("configs:\n  - {method: rmeeto, option: {ratio: 0.3}}\n")
    assert "valid keys: name, method, options, policy, selectors" in _cli_error(capsys, "--config", str(plan))
    plan.write_text("configs:\n  - {method: top, selectors: static}\n")
    assert "selectors apply to method dyvm only" in _cli_error(capsys, "--config", str(plan))
    with pytest.raises(SystemExit):  # an option before any --method: argparse's usage error
        main(["compare", "vim_tiny_patch16_224", "--method-opt", "ratio=0.3"])
    assert "give --method NAME before it" in capsys.readouterr().err
