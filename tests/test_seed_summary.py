"""mambatrim.analysis.seeds (benchmarks/seed_summary.py): statistics over seeds of one recipe, and refusal to mix recipes."""
from __future__ import annotations

import copy
import statistics

import pytest

from mambatrim.analysis import seeds as seed_summary


def _result(seed: int | None, top1: float, reduction: float = 0.36) -> dict:
    r = dict(model="vim_tiny_patch16_224", model_kwargs={"depth": 12}, img_size=32, method="dyvm",
             method_opts={"keep_ratio": 0.7}, epochs=6, lr=3e-4, global_batch=256, num_test_images=10000,
             dense={"top1": 77.65},
             dyvm={"top1": top1, "drop": round(77.65 - top1, 2), "flops_reduction": reduction,
                   "realised_block_ratio": 0.83})
    if seed is not None:
        r["seed"] = seed
    return r


def test_mean_spread_and_goal_counts() -> None:
    runs = {"a": _result(None, 76.32), "b": _result(1, 75.89), "c": _result(2, 76.22), "d": _result(3, 76.21)}
    s = seed_summary.summarize(runs, max_drop=1.5, min_reduction=0.35)
    assert [r["seed"] for r in s["rows"]] == [0, 1, 2, 3]  # the seed-less result counts as seed 0
    drops = [1.33, 1.76, 1.43, 1.44]
    assert s["drop"]["mean"] == pytest.approx(statistics.mean(drops), abs=1e-4)
    assert s["drop"]["std"] == pytest.approx(statistics.stdev(drops), abs=1e-4)
    assert (s["drop"]["min"], s["drop"]["max"]) == (1.33, 1.76)
    assert s["goal"]["seeds_meeting"] == 3 and s["goal"]["mean_meets"]
    md = seed_summary.markdown(s)
    assert "met by 3 of 4 seeds" in md and "| 1 | 75.89 | 1.76 |" in md


def test_flops_below_the_goal_fails_it_whatever_the_drop() -> None:
    runs = {"a": _result(0, 77.0, reduction=0.34), "b": _result(1, 77.1, reduction=0.34)}
    s = seed_summary.summarize(runs, max_drop=1.5, min_reduction=0.35)
    assert s["goal"]["seeds_meeting"] == 0 and not s["goal"]["mean_meets"]
    s = seed_summary.summarize(runs, max_drop=1.5)  # a goal on the drop alone
    assert s["goal"]["seeds_meeting"] == 2 and "Goal: drop <= 1.5: met by 2 of 2" in seed_summary.markdown(s)


def test_different_recipes_or_repeated_seeds_are_refused() -> None:
    a, b = _result(0, 76.0), _result(1, 76.1)
    other = copy.deepcopy(b)
    other["epochs"] = 8
    with pytest.raises(ValueError, match="'epochs'"):
        seed_summary.summarize({"a": a, "b": other})
    other = copy.deepcopy(b)
    other["dense"]["top1"] = 77.68
    with pytest.raises(ValueError, match="dense top-1"):
        seed_summary.summarize({"a": a, "b": other})
    with pytest.raises(ValueError, match="seeds repeat"):
        seed_summary.summarize({"a": a, "b": _result(0, 76.2)})
    with pytest.raises(ValueError, match="at least two"):
        seed_summary.summarize({"a": a})
