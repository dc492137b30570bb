"""Sequential selective scan: the ground truth every other backend is tested against.

One step at a time over L with an fp32 state, exactly the recurrence of Mamba-1:
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   y_t = <h_t, C_t> + D * u_t,   y *= silu(z)
Slow by design: it favours obviousness over speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    gap: Tensor | None = None,
) -> Tensor:
    """Reference scan. Shapes: u, delta, z (b, d, L); A (d, n); B, C (b, n, L); D, delta_bias (d,); gap (b, L).

    ``reverse`` scans from the last position to the first. ``gap`` (pruning-aware alignment, "decay" reading)
    counts pruned positions between each step and the previous step *in scan order*; the state then also decays
    by exp(gap * delta_prev * A) across them, with delta_prev the previous step's delta.
    """
    dtype_in = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.float()
    bsz, dim, length = u.shape
    h = u.new_zeros(bsz, dim, A.shape[1])
    ys = [None] * length
    order = range(length - 1, -1, -1) if reverse else range(length)
    prev = None
    for t in order:
        exponent = delta[:, :, t, None] * A
        if gap is not None and prev is not None:
            exponent = exponent + gap[:, t, None, None].float() * delta[:, :, prev, None] * A
        h = torch.exp(exponent) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys[t] = (h * C[:, None, :, t]).sum(-1)
        prev = t
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)
