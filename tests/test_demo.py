"""The demo's report (table, verdict, why a method is slower, plot), its timing through the one comparison
harness, and readable progress output when stdout is not a terminal."""
from __future__ import annotations

import pytest
import torch

from mambatrim.cli import main
from mambatrim.engine.compare import Configuration, time_models
from mambatrim.engine.demo import (CONTROL, DEMO_RECIPE, IMAGE_DEMO, Variant, describe_model, format_table,
                                   plot_tradeoff, verdict, why_slower)
from mambatrim.models import create_model


def row(name: str, method: str | None, top1: float, speedup: float, spread: tuple[float, float],
        flops_ratio: float = 1.5, retrain: int = 0) -> dict:
    r = {"name": name, "method": method, "options": {"keep": 0.7} if method else {}, "top1": top1,
         "retrain_epochs": retrain, "gflops": {"paper": 0.01 / flops_ratio}, "flops_ratio": flops_ratio,
         "img_per_s": 1000 * speedup, "speedup": speedup, "speedup_spread": list(spread)}
    r["why_slower"] = why_slower(r)
    return r


ROWS = [row("dense", None, 97.0, 1.0, (1.0, 1.0), 1.0),
        row("fast and accurate", "rmeeto", 95.5, 1.4, (1.2, 1.6), retrain=2),
        row("fast, inaccurate", "top", 80.0, 1.5, (1.3, 1.7)),
        row("noisy", "prune_norm", 96.9, 1.1, (0.9, 1.3)),
        row("slow", "dyvm", 96.0, 0.8, (0.7, 0.9), retrain=2),
        row("slow, little saved", "prune_static", 96.0, 0.9, (0.85, 0.95), flops_ratio=1.05)]


def test_the_verdict_needs_every_round_faster_and_accuracy_within_two_points() -> None:
    assert verdict(ROWS).endswith("within 2 points of the best dense top-1 (dense, 97.00 %): fast and accurate")
    none = verdict(ROWS[:1] + ROWS[2:])
    assert none.startswith("no method was faster than dense in every round while within 2 points")
    # and says why: what each method that meets one condition misses of the other
    assert "fast, inaccurate is faster in every round but 17.00 points below" in none
    assert "noisy is accurate enough but its slowest round is 0.90x dense" in none
    assert "slow is accurate enough but its slowest round is 0.70x dense" in none


def test_accuracy_is_judged_against_the_better_of_dense_and_its_re_trained_control() -> None:
    control = row(CONTROL, None, 97.4, 1.02, (0.9, 1.1), 1.0, retrain=2)  # 95.5 is 1.9 below it
    assert verdict(ROWS + [control]).endswith("(dense re-trained (control), 97.40 %): fast and accurate")
    better = row(CONTROL, None, 97.6, 1.0, (0.9, 1.1), 1.0, retrain=2)  # 95.5 is 2.1 below it: not within 2
    text = verdict(ROWS + [better])
    assert text.startswith("no method was faster") and "fast and accurate is faster in every round but 2.10" in text
    weaker = row(CONTROL, None, 90.0, 1.0, (0.9, 1.1), 1.0, retrain=2)  # a worse control lowers no bar
    assert verdict(ROWS + [weaker]).endswith("(dense, 97.00 %): fast and accurate")


def test_the_image_demo_shows_a_re_trained_control_and_re_trains_the_methods() -> None:
    names = [v.name for v in IMAGE_DEMO.variants]
    assert names[:2] == ["dense", CONTROL] and IMAGE_DEMO.variants[1] == Variant(CONTROL, retrain=True)
    retrained = {v.method for v in IMAGE_DEMO.variants if v.retrain and v.method}
    assert retrained == {"rmeeto", "dyvm", "combine"}
    assert {v.method for v in IMAGE_DEMO.variants if not v.retrain} >= {None, "rmeeto", "top", "prune_norm"}


def test_a_slower_method_gets_one_line_saying_why() -> None:
    reasons = {r["name"]: r["why_slower"] for r in ROWS}
    assert reasons["fast and accurate"] is None and reasons["dense"] is None
    assert reasons["slow"].startswith("its per-layer selection / gather steps cost more")
    assert reasons["slow, little saved"].startswith("removes too little work (1.05x fewer FLOPs)")
    noisy = row("noisy-slow", "top", 96.0, 0.97, (0.8, 1.1))
    assert why_slower(noisy).startswith("within this machine's timing noise (per-round speed-ups 0.80-1.10x)")


def test_table_shows_accuracy_flops_and_speed_relative_to_dense(tmp_path) -> None:
    result = {"model": "m", "threads": 1, "cpus": 2, "timing": {"batch_size": 64, "rounds": 5, "iters_per_round": 3},
              "load_average_before_timing": (3.5, 3.0, 2.0), "rows": ROWS}
    table = format_table(result)
    assert "| fast and accurate | 2 ep | 95.50 | -1.50 | 6.67 | 1.50x | 1400 | 1.40x (1.20-1.60) | keep=0.7 |" in table
    assert "load average 3.5" in table and "- slow is slower than dense here: its per-layer" in table
    control = row(CONTROL, None, 97.5, 1.02, (0.91, 1.12), 1.0, retrain=2)
    table = format_table({**result, "rows": ROWS + [control]})
    assert ("- dense re-trained (control) runs the same network as dense: its per-round speed-ups (0.91-1.12x) "
            "are this machine's timing noise") in table
    assert plot_tradeoff(ROWS, tmp_path / "p.png").stat().st_size > 5000


def test_the_demo_model_is_named_by_what_it_is() -> None:
    m = create_model(DEMO_RECIPE["model"], **DEMO_RECIPE["model_kwargs"], img_size=DEMO_RECIPE["input_size"],
                     in_chans=1, num_classes=10)
    text = describe_model(m, DEMO_RECIPE["input_size"])
    assert text.startswith("Vim with 4 blocks, 64-dim, 32 x 32 px in 4 px patches = 64 patch tokens")


def test_time_models_needs_one_model_per_configuration_and_a_dense_one() -> None:
    m = create_model("vim_tiny_patch16_224", embed_dim=16, depth=1, patch_size=4, stride=4, img_size=8)
    with pytest.raises(ValueError, match="one model per configuration and a 'dense' one"):
        time_models({"a": m}, [Configuration("a")], torch.randn(1, 3, 8, 8), rounds=1, iters=1, warmup=0)
    rows, _ = time_models({"dense": m.eval()}, [Configuration("dense")], torch.randn(2, 3, 8, 8), rounds=2,
                          iters=1, warmup=0)
    assert rows[0]["speedup"] == 1.0 and len(rows[0]["ms_rounds"]) == 2


def test_progress_in_a_log_file_is_one_line_per_epoch(tmp_path, capsys) -> None:
    torch.set_num_threads(1)
    args = ["train", "--model-opt", "embed_dim=16", "--model-opt", "depth=1", "--model-opt", "patch_size=4",
            "--model-opt", "stride=4", "--input-size", "8", "--in-chans", "1", "--mixup", "0", "--cutmix", "0",
            "--num-workers", "0", "--device", "cpu", "--batch-size", "256", "--epochs", "2",
            "--output-dir", str(tmp_path / "run")]
    assert main(args) == 0
    captured = capsys.readouterr()  # not a terminal: no bar, one line per epoch
    assert "\r" not in captured.out + captured.err
    assert "epoch 0/2: train loss" in captured.out and "epoch 1/2: train loss" in captured.out
    assert "with embed_dim=16, depth=1, patch_size=4, stride=4" in captured.out
