"""The interleaved timing helper the speed benchmarks share: every runner once per round, in order, after its
switch and one untimed call; per-round times returned per runner."""
from __future__ import annotations

import time

import torch

from mambatrim.engine.benchmark import interleaved_times_ms


def test_interleaved_rounds_time_every_runner_once_per_round_in_order() -> None:
    calls: list[str] = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: (calls.append("b"), time.sleep(0.004))}
    logged: list[tuple[int, str]] = []
    times = interleaved_times_ms(runners, rounds=2, iters=3, device=torch.device("cpu"),
                                 switch=lambda key: calls.append(f"switch {key}"),
                                 log=lambda r, key, ms: logged.append((r, key)))
    one_round = ["switch a"] + ["a"] * 4 + ["switch b"] + ["b"] * 4  # one untimed call, then 3 timed
    assert calls == one_round * 2
    assert logged == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    assert set(times) == {"a", "b"} and all(len(v) == 2 for v in times.values())
    assert min(times["b"]) >= 4.0 > max(times["a"])  # ms per call: b sleeps 4 ms, a does not


def test_a_cpu_round_is_the_fastest_of_its_calls(monkeypatch) -> None:
    """Other processes only add time to a call: on a CPU a round reports the least disturbed call, not the mean."""
    from mambatrim.engine import benchmark

    clock = {"now": 0.0}

    def call() -> None:
        clock["now"] += next(durations)

    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock["now"])
    durations = iter([0.005, 0.010, 0.002, 0.030])  # untimed call 5 ms, then 10, 2, 30 ms
    times = interleaved_times_ms({"a": call}, rounds=1, iters=3, device=torch.device("cpu"))  # mean: 14 ms
    assert abs(times["a"][0] - 2.0) < 1e-9
