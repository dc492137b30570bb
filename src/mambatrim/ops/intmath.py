"""Integer helpers for kernel launches on the host.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in recent Triton: a host call unwraps
its arguments first and costs about 2 µs (Triton 3.8), against well under 0.1 µs for the arithmetic, and a scan
call makes about ten of them. Launch code uses these instead; kernels keep ``tl.cdiv``."""
from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
