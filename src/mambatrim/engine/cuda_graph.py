"""CUDA-graph inference: capture a model's forward once for a fixed input shape, then replay it.

A Vim forward launches hundreds of small kernels; at moderate batch sizes the host cannot issue them as fast
as the H100 runs them, so eager throughput is set by Python, not by the GPU. Replaying a captured graph removes
that overhead (Vim-S bf16 batch 128: see ``benchmarks/results/gpu_throughput.md``). Token-reduction methods
whose forward never synchronises with the host (R-MeeTo merging, DyVM token pruning at inference, plain pruning,
ToP with alignment on the fused Triton mixer) capture too; a forward that does synchronise (per-sample direction
skipping on the PyTorch path, alignment without a known dense length) cannot, and says so.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .precision import autocast_to


@contextmanager
def collector_paused() -> Iterator[None]:
    """Collect Python's cyclic garbage now, then keep the collector off until the block ends (a CUDA capture).

    A dead graph in a reference cycle (a :class:`GraphedForward` is one: its replay closes over the object) is
    destroyed whenever the collector next runs; tearing a graph down during another capture is an operation a
    capturing stream does not permit. PyTorch's own capture no longer collects first (``force_cudagraph_gc``). A
    benchmark process once failed a capture (``cudaErrorStreamCaptureInvalidated``) after a few dozen graphed
    models; that this was the cause is not shown (it did not recur in isolation): this is a guard, one
    collection a capture."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def capture_graph(fn: Callable[[], object], warmup: int = 3) -> GraphReplay:
    """Capture ``fn`` (after ``warmup`` calls on a side stream: autotuning, lazy init) as a CUDA graph; returns
    its replay. ``fn`` must read and write the same tensors on every call; the replay keeps ``fn`` (and so the
    tensors it closes over) alive."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with collector_paused(), torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:
        raise RuntimeError(
            "this forward cannot be captured in a CUDA graph (it synchronises with the host, e.g. per-sample "
            "scan-direction skipping off the fused Triton mixer, or position-aligned pruning without a known dense "
            f"length); run it eagerly. Cause: {err}") from err
    return GraphReplay(graph, fn)


class GraphReplay:
    """A captured graph's replay that keeps the captured function, and so whatever it closes over, alive.

    The graph reads and writes fixed addresses. A caller that kept only ``graph.replay`` could free the static
    tensors the function closed over (a loop rebinding them, say); the next capture's ``empty_cache`` then hands
    their memory back to the driver, and the replay reads unmapped memory (an illegal access) or, short of that,
    another tensor's values."""

    def __init__(self, graph: torch.cuda.CUDAGraph, fn: Callable[[], object]) -> None:
        self.graph = graph
        self.fn = fn

    def __call__(self) -> None:
        self.graph.replay()


class GraphedForward:
    """``GraphedForward(model, example)(images) -> model(images)`` with the forward replayed from a CUDA graph.

    The output (a tensor, or whatever structure of tensors the model returns) lives in the graph's static
    buffers: clone it if you keep it across calls. Inputs must have the captured shape and dtype. The model
    must not change structure afterwards (weights may change in place).
    """

    def __init__(self, model: nn.Module, example: Tensor, autocast_dtype: torch.dtype | None = None,
                 warmup: int = 3) -> None:
        if example.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA input, got one on {example.device}")
        self.model = model
        self.static_in = example.detach().clone()
        amp = (lambda: autocast_to("cuda", autocast_dtype))
        outputs: list[Any] = []

        def forward() -> None:
            with torch.no_grad(), amp():
                outputs[:] = [model(self.static_in)]

        self._replay = capture_graph(forward, warmup)
        self.static_out = outputs[0]  # written by the captured call: the graph's output buffer

    def __call__(self, images: Tensor) -> Any:
        if images.shape != self.static_in.shape or images.dtype != self.static_in.dtype:
            raise ValueError(f"the graph was captured for inputs {tuple(self.static_in.shape)} "
                             f"{self.static_in.dtype}, got {tuple(images.shape)} {images.dtype}")
        self.static_in.copy_(images)
        self._replay()
        return self.static_out


class GraphedStudent(nn.Module):
    """A training forward (``x -> (logits, TokenState)``, e.g. ``StudentForward``) whose forward AND backward
    replay CUDA graphs (``torch.cuda.make_graphed_callables``), captured at the first training call.

    Why: an eager Vim training step launches thousands of small kernels (more with a reduction method's index
    arithmetic); the host then cannot keep the GPU busy. Replayed, the step costs what its kernels cost.

    Replays only for the captured input shape while ``model`` is in training mode; anything else (a short last
    batch, evaluation) runs ``inner`` eagerly. The outputs are the graph's buffers: they hold until the next
    call, which is all a training step needs. If the forward cannot be captured (it synchronises with the host,
    or its outputs vary in structure), a warning says why and every call runs eagerly.
    Single-process only (DDP's gradient hooks run outside the graph).
    """

    def __init__(self, inner: nn.Module, model: nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.inner, self.autocast_dtype = inner, autocast_dtype
        self._model = [model]  # not a submodule: ``inner`` already holds it
        self._graphed: Callable[..., Any] | None = None
        self._shape: tuple | None = None
        self._spec: Any = None
        self._meta: dict[str, Any] = {}
        self.failed: str | None = None

    def _flat(self, x: Tensor) -> tuple[Tensor, ...]:
        from torch.utils._pytree import tree_flatten

        logits, state = self.inner(x)
        leaves, spec = tree_flatten((logits, _state_tree(state)))
        self._spec, self._meta = spec, _state_meta(state)
        return tuple(leaves)

    def _capture(self, x: Tensor) -> None:
        import warnings

        flat_module = _FlatForward(self)
        amp = autocast_to("cuda", self.autocast_dtype, cache_enabled=False)
        try:
            with amp, collector_paused():
                self._graphed = torch.cuda.make_graphed_callables(flat_module, (x.detach().clone(),),
                                                                     allow_unused_input=True)
            self._shape = (tuple(x.shape), x.dtype)
        except Exception as err:  # noqa: BLE001 (any capture failure means: run eagerly)
            self.failed = f"{type(err).__name__}: {err}"
            warnings.warn(f"training step not captured in a CUDA graph, running eagerly: {self.failed}")

    def forward(self, x: Tensor) -> tuple[Tensor, Any]:
        model = self._model[0]
        if not (model.training and x.is_cuda and torch.is_grad_enabled()) or self.failed:
            return self.inner(x)
        if self._graphed is None:
            self._capture(x)
            if self._graphed is None:
                return self.inner(x)
        if (tuple(x.shape), x.dtype) != self._shape:
            return self.inner(x)
        from torch.utils._pytree import tree_unflatten

        logits, tree = tree_unflatten(list(self._graphed(x)), self._spec)
        return logits, _state_from_tree(tree, self._meta)


class _FlatForward(nn.Module):
    """``GraphedStudent.inner`` with its outputs flattened to a tuple of tensors (what capture needs)."""

    def __init__(self, owner: GraphedStudent) -> None:
        super().__init__()
        self.inner = owner.inner
        self._owner = [owner]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self._owner[0]._flat(x)


def _state_tree(state: Any) -> dict[str, Any]:
    """A TokenState as a pytree of tensors (None and non-tensor values kept out of the leaves)."""
    fields = {k: getattr(state, k) for k in ("hidden", "residual", "positions", "protected", "sizes", "mask")}
    tree = {k: v for k, v in fields.items() if isinstance(v, Tensor)}
    tree["extras"] = {k: v for k, v in state.extras.items() if _all_tensors(v)}
    return tree


def _all_tensors(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, Tensor) for v in value)


def _state_meta(state: Any) -> dict[str, Any]:
    """A TokenState's non-tensor fields (fixed for a captured shape): what the tree leaves out."""
    return {"grid": state.grid, "protected_layout": state.protected_layout}


def _state_from_tree(tree: dict[str, Any], meta: dict[str, Any]) -> Any:
    from ..contract import TokenState

    fields = {k: v for k, v in tree.items() if k != "extras"}
    return TokenState(residual=fields.pop("residual", None), extras=dict(tree["extras"]), **meta, **fields)
