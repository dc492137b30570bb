"""CUDA-graph inference: capture a model's forward once for a fixed input shape, then replay it.

A Vim forward launches hundreds of small kernels; at moderate batch sizes the host cannot issue them as fast
as the H100 runs them, so eager throughput is set by Python, not by the GPU. Replaying a captured graph removes
that overhead (Vim-S bf16 batch 128: see ``benchmarks/results/gpu_throughput.md``). Token-reduction methods
whose forward never synchronises with the host (R-MeeTo merging, DyVM token pruning at inference, plain pruning)
capture too; a forward that does synchronise (per-sample direction skipping, aligned ToP) cannot, and says so.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import Tensor, nn


def capture_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """Capture ``fn`` (after ``warmup`` calls on a side stream: autotuning, lazy init) as a CUDA graph; returns
    its replay. ``fn`` must read and write the same tensors on every call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:
        raise RuntimeError(
            "this forward cannot be captured in a CUDA graph (it synchronises with the host, e.g. per-sample "
            f"scan-direction skipping or position-aligned pruning); run it eagerly. Cause: {err}") from err
    return graph.replay


class GraphedForward:
    """``GraphedForward(model, example)(images) -> logits`` with the forward replayed from a CUDA graph.

    The output tensor is the graph's static buffer: clone it if you keep it across calls. Inputs must have the
    captured shape and dtype. The model must not change structure afterwards (weights may change in place).
    """

    def __init__(self, model: nn.Module, example: Tensor, autocast_dtype: torch.dtype | None = None,
                 warmup: int = 3) -> None:
        if example.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA input, got one on {example.device}")
        self.model = model
        self.static_in = example.detach().clone()
        amp = (lambda: torch.autocast("cuda", dtype=autocast_dtype)) if autocast_dtype else nullcontext
        outputs: list[Tensor] = []

        def forward() -> None:
            with torch.no_grad(), amp():
                outputs[:] = [model(self.static_in)]

        self._replay = capture_graph(forward, warmup)
        self.static_out = outputs[0]  # written by the captured call: the graph's output buffer

    def __call__(self, images: Tensor) -> Tensor:
        if images.shape != self.static_in.shape or images.dtype != self.static_in.dtype:
            raise ValueError(f"the graph was captured for inputs {tuple(self.static_in.shape)} "
                             f"{self.static_in.dtype}, got {tuple(images.shape)} {images.dtype}")
        self.static_in.copy_(images)
        self._replay()
        return self.static_out
