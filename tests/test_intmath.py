"""The launch code's integer helpers agree with Triton's own (which cost more to call on the host)."""
import pytest

triton = pytest.importorskip("triton")

from mambatrim.ops.intmath import cdiv, next_power_of_2  # noqa: E402


def test_cdiv_matches_triton():
    for a in range(0, 200):
        for b in range(1, 35):
            assert cdiv(a, b) == triton.cdiv(a, b)


def test_next_power_of_2_matches_triton():
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
    assert next_power_of_2(0) == 1  # a block size: never 0
