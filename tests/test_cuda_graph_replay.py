"""``capture_graph``'s replay keeps what the captured function closes over alive; captures run with the cyclic
collector paused, so that no dead graph is torn down during one.

A graph reads fixed addresses. When the caller kept only ``graph.replay``, a static input rebound in a loop was
freed, the next capture's ``empty_cache`` returned its memory to the driver, and the earlier graph's replay hit
an illegal memory access (the segmentation benchmark's head graphs did).
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from mambatrim.engine.cuda_graph import GraphReplay, capture_graph, collector_paused


class CountingGraph:
    """Stands in for a CUDA graph on the CPU: counts replays."""

    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


def test_replay_holds_the_closure_and_its_tensors() -> None:
    static = torch.randn(4)
    alive = weakref.ref(static)

    def fn(x: torch.Tensor = static) -> None:
        x.mul_(1.0)

    graph = CountingGraph()
    replay = GraphReplay(graph, fn)  # type: ignore[arg-type]
    del static, fn
    gc.collect()
    assert alive() is not None  # the replay keeps the closed-over tensor
    replay()
    replay()
    assert graph.replays == 2
    del replay
    gc.collect()
    assert alive() is None  # and nothing else does


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_earlier_graph_replays_after_its_inputs_lost_every_other_reference() -> None:
    """Capture graphs in a loop that rebinds their inputs, as a benchmark does, then replay the first."""
    replays, outputs, expected = [], [], []
    for seed in range(3):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        static = torch.randn(1 << 22, device="cuda", generator=generator)  # 16 MiB: a segment of its own
        out = torch.empty_like(static)
        expected.append(static * 2 + 1)

        def fn(x: torch.Tensor = static, y: torch.Tensor = out) -> None:
            torch.add(x * 2, 1, out=y)

        replays.append(capture_graph(fn, warmup=1))
        outputs.append(out)
        del static, fn  # the loop's own references go; only the replay may hold the input now
    gc.collect()
    torch.cuda.empty_cache()
    filler = torch.full((1 << 24,), 7.0, device="cuda")  # reuses any freed block
    for replay, out, want in zip(replays, outputs, expected):
        out.zero_()
        replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
    del filler


class Cycle:
    """Garbage in a reference cycle that records when it is destroyed."""

    destroyed: list[str] = []

    def __init__(self, name: str) -> None:
        self.name, self.me = name, self

    def __del__(self) -> None:
        Cycle.destroyed.append(self.name)


def test_collector_paused_collects_first_then_defers_to_the_end() -> None:
    Cycle.destroyed.clear()
    Cycle("before")  # dead at once, freed only by a collection
    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)  # a collection at nearly every allocation
    try:
        with collector_paused():
            assert Cycle.destroyed == ["before"]
            assert not gc.isenabled()
            for i in range(50):
                Cycle(f"during {i}")
            assert Cycle.destroyed == ["before"]  # nothing torn down inside the block
        assert gc.isenabled()
        gc.collect()
        assert len(Cycle.destroyed) == 51
        gc.disable()
        with collector_paused():
            pass
        assert not gc.isenabled()  # a collector that was off stays off
    finally:
        gc.enable()
        gc.set_threshold(*thresholds)
