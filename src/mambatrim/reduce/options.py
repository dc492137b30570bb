"""One vocabulary of method options, with the papers' names as documented aliases, validated everywhere.

Canonical names shared by every method:

=============  ==============================================================================================
``keep``        fraction of the tokens kept (per pruning event for ToP and the baselines, per stage for DyVM
                (its rho), of the dense token-layers for R-MeeTo, i.e. ``1 - ratio``)
``layers``      block indices at whose input the method reduces tokens
=============  ==============================================================================================

Aliases (the papers' and released code's names): DyVM ``keep_ratio`` / ``rho`` -> ``keep`` and
``pruning_layers`` -> ``layers``. R-MeeTo keeps its paper's ``ratio`` (the reduction ratio, ``1 - keep``) and
``r`` (tokens merged per event). A misspelt or foreign option raises one line naming the method's valid options.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable, Iterable

__all__ = ["method_options"]


def method_options(method: str, aliases: dict[str, str] | None = None,
                   extra: Callable[[], Iterable[str]] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a method's ``apply(model, **options)``: map ``aliases`` onto canonical names and refuse any
    option that is neither a parameter of ``apply`` nor in ``extra()`` (options passed through ``**kwargs``)."""
    aliases = dict(aliases or {})

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)][1:]  # every option after the model

        def valid() -> list[str]:
            return [p.name for p in params] + list(extra() if extra else [])

        @functools.wraps(fn)
        def apply(model: Any, **options: Any) -> Any:
            names = valid()
            for alias, canonical in aliases.items():
                if alias in options:
                    if canonical in options:
                        raise ValueError(f"{method}: give {canonical}= or its alias {alias}=, not both")
                    options[canonical] = options.pop(alias)
            unknown = [k for k in options if k not in names]
            if unknown:
                raise ValueError(unknown_option_message(method, unknown[0], names, aliases))
            return fn(model, **options)

        return apply

    return wrap


def unknown_option_message(method: str, key: str, names: list[str], aliases: dict[str, str]) -> str:
    shown = [n + (f" (alias {', '.join(a for a, c in aliases.items() if c == n)})"
                  if n in aliases.values() else "") for n in names]
    close = difflib.get_close_matches(key, names + list(aliases), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{method}: unknown option {key!r}{hint}; valid options: {', '.join(shown)}"
