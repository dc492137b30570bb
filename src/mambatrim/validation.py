"""The one place user-given numbers are checked: each failure is a one-line ``ValueError`` that names the
option, the value given and the valid range, so the CLI, the config loader and the Python API refuse bad input
alike (zero, negative and out-of-range values are never silently replaced by a default)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

# kind -> (test, description of the valid range)
_KINDS: dict[str, tuple[Any, str]] = {
    "positive_int": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "non_negative_int": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "positive": (lambda v: _is_real(v) and v > 0, "a number > 0"),
    "non_negative": (lambda v: _is_real(v) and v >= 0, "a number >= 0"),
    "fraction": (lambda v: _is_real(v) and 0 < v <= 1, "a fraction in (0, 1]"),
    "probability": (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "fraction_below_one": (lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check(value: Any, option: str, kind: str) -> Any:
    """Return ``value`` if it is of ``kind`` (see ``KINDS``), else raise a one-line ValueError naming ``option``.

    ``None`` passes (an unset option means "use the default"); an explicit 0 or a negative value does not.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown check {kind!r}; valid: {', '.join(_KINDS)}")
    test, valid = _KINDS[kind]
    if value is not None and not test(value):
        raise ValueError(f"{option} must be {valid}, got {value!r}")
    return value


def check_choice(value: Any, option: str, choices: Iterable[Any], owner: str | None = None) -> Any:
    """Return ``value`` if it is one of ``choices`` (a sequence, or a mapping's keys), else raise a one-line
    ValueError naming ``option`` and every valid choice (prefixed ``owner: `` when given)."""
    if value not in choices:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}unknown {option} {value!r}; choose one of {', '.join(str(c) for c in choices)}")
    return value


def check_all(values: Mapping[str, Any], kinds: Mapping[str, str], option_name: Any = str) -> None:
    """``check`` every ``values[key]`` whose key has a kind in ``kinds``; ``option_name(key)`` is the name shown."""
    for key, kind in kinds.items():
        if key in values:
            check(values[key], option_name(key), kind)


KINDS = tuple(_KINDS)
