"""K scan paths over one token set, each visiting the tokens in its own order given as an index.

Grid orders (PlainMamba's zig-zags, GroupMamba's per-group raster directions, any order after pruning) are a
permutation of the tokens. Instead of gathering every input into visiting order and scattering each output
back, :func:`scan_paths` reads the inputs through the index inside the scan and writes each step's output to its
token, summing the paths (or concatenating their channel slices) in the same launch.

Per path k and scan step t, with ``tok = index[k, t]``:
    u        read at ``tok`` (``u_at='token'``) or at t (``u_at='step'``: u already in visiting order),
    delta, B, C  read at ``tok`` (``bc_at='token'``) or at t (``bc_at='step'``: PlainMamba reads them at
             raster index t, a faithful quirk of its official code, or inputs already in visiting order),
    B_add    (optional) added to B at step t (PlainMamba's direction embedding ``direction_Bs``),
    z        read at ``tok`` (gate ``y * silu(z)``, optional), gap at t (pruned tokens skipped before step t),
    y        written to ``tok``, times ``scale`` (and the per-sample ``weight[b, k]``), summed over paths
             (``combine='sum'``) or into path k's channel slice (``combine='concat'``).

Input layouts: u, delta, z are (b, E, L) shared by the paths, (b, K*E, L) where path k owns channels
[k*E, (k+1)*E), or (K, b, E, L) per path; B, C are (b, N, L) shared or (K, b, N, L); A (K, E, N);
D, delta_bias (K, E); index (K, L) shared by the batch or (K, b, L) per sample; gap (K, b, L); B_add (K, L, N)
or (K, b, L, N); weight (b, K). Backends: ``ref`` and ``torch`` gather into visiting order, run
:func:`selective_scan` per path and scatter back (the reference and the fallback), ``triton`` runs
:mod:`~mambatrim.ops.triton_scan_paths`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..validation import check_choice

__all__ = ["scan_paths", "take_tokens", "put_tokens", "PLACES", "PATH_COMBINES"]

PLACES = ("token", "step")
PATH_COMBINES = ("sum", "concat")


def take_tokens(t: Tensor, index: Tensor) -> Tensor:
    """(b, C, L) columns ``index`` (b, L): the tokens in a path's visiting order."""
    return t.gather(2, index[:, None, :].expand(-1, t.shape[1], -1))


def put_tokens(t: Tensor, index: Tensor) -> Tensor:
    """Inverse of :func:`take_tokens`: visiting order back to token order."""
    return torch.empty_like(t).scatter_(2, index[:, None, :].expand(-1, t.shape[1], -1), t)


def per_path(t: Tensor | None, paths: int, width: int, name: str) -> Tensor | None:
    """A (b, C, L) input as a (K, b, C', L) view: shared by the paths (C = width, stride 0 over K), sliced by
    channel (C = K * width) or already per path (4-D)."""
    if t is None or t.dim() == 4:
        if t is not None and t.shape[0] != paths:
            raise ValueError(f"scan_paths: {name} has {t.shape[0]} paths, A has {paths}")
        return t
    if t.dim() != 3:
        raise ValueError(f"scan_paths: {name} must be 3-D (batch, channels, length) or 4-D (paths, batch, "
                         f"channels, length), got shape {tuple(t.shape)}")
    if t.shape[1] == width:
        return t[None].expand(paths, -1, -1, -1)
    if t.shape[1] == paths * width:
        return t.unflatten(1, (paths, width)).transpose(0, 1)
    raise ValueError(f"scan_paths: {name} has {t.shape[1]} channels; expected {width} (shared by the paths) or "
                     f"{paths} x {width} (one slice per path)")


def _batched(t: Tensor | None, bsz: int, name: str, rows: int) -> Tensor | None:
    """index / gap / B_add with the batch axis made explicit (stride 0 where shared)."""
    if t is None:
        return None
    if t.dim() == rows:  # no batch axis: shared by every sample
        t = t[:, None].expand(t.shape[0], bsz, *t.shape[1:])
    if t.dim() != rows + 1 or t.shape[1] != bsz:
        raise ValueError(f"scan_paths: {name} has shape {tuple(t.shape)}; expected (paths, length, ...) or "
                         f"(paths, batch={bsz}, length, ...)")
    return t


def scan_paths(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    index: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    u_at: str = "token",
    bc_at: str = "token",
    B_add: Tensor | None = None,
    gap: Tensor | None = None,
    weight: Tensor | None = None,
    combine: str = "sum",
    scale: float = 1.0,
    backend: str | None = None,
) -> Tensor:
    """K selective scans, path k visiting the tokens in the order ``index[k]`` (see the module docstring).

    Returns (b, E, L) for ``combine='sum'`` or (b, K*E, L) for 'concat', in u's dtype, token-major memory on
    the 'triton' backend (ready for ``out_proj``). The state is fp32 whatever the input dtype.
    """
    from . import _check_name, get_backend, selective_scan  # noqa: PLC0415 (the package imports this module)

    if A.dim() != 3:
        raise ValueError(f"scan_paths: A must be (paths, channels, d_state), got shape {tuple(A.shape)}")
    paths, width, _ = A.shape
    check_choice(u_at, "u_at", PLACES, "scan_paths")
    check_choice(bc_at, "bc_at", PLACES, "scan_paths")
    check_choice(combine, "combine", PATH_COMBINES, "scan_paths")
    u4, delta4, z4 = (per_path(t, paths, width, name) for t, name in ((u, "u"), (delta, "delta"), (z, "z")))
    B4, C4 = (per_path(t, paths, t.shape[-2], name) for t, name in ((B, "B"), (C, "C")))
    bsz, length = u4.shape[1], u4.shape[-1]
    index = _batched(index, bsz, "index", 2)
    if index.shape[-1] != length:
        raise ValueError(f"scan_paths: index visits {index.shape[-1]} tokens, the inputs have {length}")
    B_add = _batched(B_add, bsz, "B_add", 3)
    if gap is not None and tuple(gap.shape) != (paths, bsz, length):
        raise ValueError(f"scan_paths: gap must be (paths, batch, length) = {(paths, bsz, length)}, "
                         f"got {tuple(gap.shape)}")
    if weight is not None and tuple(weight.shape) != (bsz, paths):
        raise ValueError(f"scan_paths: weight must be (batch, paths) = {(bsz, paths)}, got {tuple(weight.shape)}")
    if u.is_meta:
        return u.new_empty(bsz, width * (paths if combine == "concat" else 1), length)
    name = _check_name(backend) if backend is not None else get_backend(u.device.type)
    args = (u4, delta4, A, B4, C4, D, z4, delta_bias, delta_softplus, index, u_at, bc_at, B_add, gap, weight,
            combine, scale)
    if name == "triton":
        from .triton_scan_paths import scan_paths_triton  # noqa: PLC0415 (needs triton)

        return scan_paths_triton(*args)
    return scan_paths_gathered(lambda *a, **kw: selective_scan(*a, backend=name, **kw), *args)


def scan_paths_gathered(scan: Callable[..., Tensor], u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                        index, u_at, bc_at, B_add, gap, weight, combine, scale) -> Tensor:
    """Per path: gather into visiting order, ``scan`` (a :func:`selective_scan`), scatter back; then combine.
    Inputs as :func:`scan_paths` normalises them (4-D per-path views, batched index)."""
    outs = []
    for k in range(A.shape[0]):
        idx = index[k]
        uk = take_tokens(u[k], idx) if u_at == "token" else u[k]
        dk, Bk, Ck = ((take_tokens(t[k], idx) for t in (delta, B, C)) if bc_at == "token"
                      else (delta[k], B[k], C[k]))
        if B_add is not None:
            Bk = Bk + B_add[k].transpose(1, 2).to(Bk.dtype)
        y = scan(uk, dk, A[k], Bk, Ck, None if D is None else D[k], None if z is None else take_tokens(z[k], idx),
                 delta_bias=None if delta_bias is None else delta_bias[k], delta_softplus=delta_softplus,
                 gap=None if gap is None else gap[k])
        y = put_tokens(y, idx) * scale
        outs.append(y if weight is None else y * weight[:, k, None, None].to(y.dtype))
    if combine == "concat":
        return torch.cat(outs, 1)
    total = outs[0]
    for y in outs[1:]:
        total = total + y
    return total
