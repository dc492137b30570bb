"""Pick a setting of one reduction method for a budget: candidate settings measured on this device in one
process (the comparison harness, :func:`mambatrim.engine.compare.compare`: interleaved rounds, CUDA graphs on a
GPU), their Pareto front, and the chosen one.

Targets: ``speedup=X`` (at least X times dense throughput here), ``img_per_s=X``, ``gflops=X`` (at most X GFLOPs
per image, paper convention) or ``max_drop=X`` (at most X points of top-1 lost; needs a checkpoint and data, each
candidate is evaluated on the evaluation split). A candidate slower than dense on this device is flagged and
never chosen. Among the candidates that meet the target the one that keeps the most is chosen: the highest
top-1 where it was measured, else the least work removed (the largest GFLOPs; for ``max_drop``: the fastest).
The time a search takes is bounded by the candidate count and the rounds (reported in the result).
"""
from __future__ import annotations

import time
from typing import Any, Callable

from .compare import Configuration, compare

TARGETS = ("speedup", "img_per_s", "gflops", "max_drop")
# Candidate settings per method family (any other registered method: give candidates explicitly).
_KEEP = [{"keep": k} for k in (0.9, 0.8, 0.7, 0.6, 0.5)]
CANDIDATES: dict[str, list[dict[str, Any]]] = {
    "rmeeto": [{"ratio": r} for r in (0.1, 0.2, 0.31, 0.4, 0.5)],
    "dyvm": [{"keep": k, "block_ratio": b} for k in (0.9, 0.8, 0.7, 0.6) for b in (None, 0.8)],
    **{name: _KEEP for name in ("top", "prune_norm", "prune_static", "prune_random")},
}


def parse_target(text: str) -> tuple[str, float]:
    """``'speedup=1.3'`` -> ('speedup', 1.3); anything else is one line naming the valid forms."""
    key, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if key not in TARGETS or number <= 0:
        raise ValueError(f"target {text!r}: give one of {', '.join(k + '=NUMBER' for k in TARGETS)} with a "
                         f"positive number (e.g. speedup=1.3)")
    return key, number


def candidates_for(method: str, given: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    if given:
        return given
    if method not in CANDIDATES:
        raise ValueError(f"no default candidate settings for method {method!r} (defaults exist for "
                         f"{', '.join(sorted(CANDIDATES))}); give candidates explicitly")
    return CANDIDATES[method]


def _configuration(method: str, options: dict[str, Any]) -> Configuration:
    """A candidate as a harness configuration. The harness times random weights (the work per image does not
    depend on them), so DyVM's selectors get the static policy that switches off ``1 - block_ratio`` of the scan
    directions (random selectors decide nothing realistic)."""
    name = " ".join([method] + [f"{k}={v}" for k, v in options.items()])
    static = method == "dyvm" and options.get("block_ratio") is not None
    return Configuration(name, method, dict(options), selectors="static" if static else None)


def search(model: str, method: str, target: str, candidates: list[dict[str, Any]] | None = None,
           accuracy: Callable[[str | None, dict[str, Any]], float] | None = None,
           log: Callable[[str], None] | None = None, **timing: Any) -> dict[str, Any]:
    """Measure ``method``'s candidate settings on ``model`` against dense and choose one for ``target``.

    ``accuracy(method, options)`` -> top-1 (method None: dense), given when a checkpoint and data are;
    ``timing``: :func:`~mambatrim.engine.compare.compare`'s keywords (device, batch_size, dtype, rounds, ...)."""
    kind, goal = parse_target(target)
    if kind == "max_drop" and accuracy is None:
        raise ValueError("target max_drop needs accuracy: give a checkpoint and the data to evaluate it on")
    options = candidates_for(method, candidates)
    start = time.time()
    configs = [_configuration(method, o) for o in options]
    result = compare(model, configs, log=log, **timing)
    rows = [r for r in result["rows"] if r["config"] != "dense" and r["mode"] == result["modes"][0]]
    dense_top1 = accuracy(None, {}) if accuracy else None
    for row, opts in zip(rows, options):
        row["options"] = opts
        row["slower_than_dense"] = row.get("speedup", 0.0) < 1.0
        if accuracy:
            row["top1"] = accuracy(method, opts)
            row["top1_drop"] = dense_top1 - row["top1"]
    for row in rows:
        row["pareto"] = not any(_dominates(other, row) for other in rows if other is not row)
        row["meets_target"] = _meets(row, kind, goal) and not row["slower_than_dense"]
    chosen = _choose([r for r in rows if r["meets_target"]], kind)
    return dict(search=method, model=model, target=target, dense_top1=dense_top1, rows=rows,
                chosen=chosen["config"] if chosen else None, chosen_options=chosen["options"] if chosen else None,
                seconds=round(time.time() - start, 1), environment=result["environment"],
                timing={k: result[k] for k in ("img_size", "batch_size", "dtype", "modes", "rounds",
                                               "iters_per_round", "warmup")})


def _score(row: dict[str, Any]) -> tuple[float, float]:
    """(speed, what is kept): higher is better in both; kept = top-1 where measured, else GFLOPs."""
    return row.get("speedup", 0.0), row.get("top1", row["gflops"]["paper"])


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    sa, sb = _score(a), _score(b)
    return all(x >= y for x, y in zip(sa, sb)) and sa != sb


def _meets(row: dict[str, Any], kind: str, goal: float) -> bool:
    if "speedup" not in row:
        return False
    value = {"speedup": row["speedup"], "img_per_s": row["img_per_s"], "gflops": -row["gflops"]["paper"],
             "max_drop": -row.get("top1_drop", float("inf"))}[kind]
    return value >= (-goal if kind in ("gflops", "max_drop") else goal)


def _choose(eligible: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    if not eligible:
        return None
    if kind == "max_drop":
        return max(eligible, key=lambda r: r["speedup"])
    return max(eligible, key=lambda r: _score(r)[1])


def method_opt_line(method: str, options: dict[str, Any]) -> str:
    """The chosen setting as command-line options (``--method rmeeto --method-opt ratio=0.31``)."""
    def value(v: Any) -> str:
        return "null" if v is None else str(v).replace(" ", "")
    return " ".join([f"--method {method}"] + [f"--method-opt {k}={value(v)}" for k, v in options.items()])


def yaml_lines(method: str, options: dict[str, Any]) -> str:
    """The chosen setting as a recipe fragment (``method:`` and ``method_opts:``)."""
    opts = ", ".join(f"{k}: {'null' if v is None else v}" for k, v in options.items())
    return f"method: {method}\nmethod_opts: {{{opts}}}"


def to_markdown(result: dict[str, Any]) -> str:
    """The candidates with their speed-up, FLOPs, accuracy, Pareto membership and flags, then the choice."""
    env, t = result["environment"], result["timing"]
    lines = [f"# Search: {result['search']} on {result['model']} for {result['target']}", "",
             f"{env['device_name']}, batch {t['batch_size']}, {t['dtype']}, {t['img_size']} px, "
             f"{'/'.join(t['modes'])}, median of {t['rounds']} interleaved rounds x {t['iters_per_round']}; "
             f"torch {env['torch']}, commit {env['git_commit'] or 'unknown'}, {env['date']}; search took "
             f"{result['seconds']:.0f} s.", "",
             "| setting | img/s | speed-up (spread) | GFLOPs | top-1 | Pareto | meets target | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        speed = f"{r['img_per_s']:.0f} | {r['speedup']:.3f}x ({r['speedup_spread'][0]:.3f}-" \
                f"{r['speedup_spread'][1]:.3f})" if "speedup" in r else "not timed | "
        top1 = f"{r['top1']:.2f}" if "top1" in r else "-"
        note = "slower than dense here: never chosen" if r["slower_than_dense"] else ""
        note = "**chosen**" if r["config"] == result["chosen"] else note
        lines.append(f"| {r['config']} | {speed} | {r['gflops']['paper']:.3f} | {top1} | "
                     f"{'yes' if r['pareto'] else ''} | {'yes' if r['meets_target'] else ''} | {note} |")
    lines.append("")
    if result["chosen"] is None:
        lines.append(f"No candidate meets {result['target']} on this device without being slower than dense.")
    else:
        lines += ["Chosen setting:", "", "```", method_opt_line(result["search"], result["chosen_options"]), "```",
                  "", "```yaml", yaml_lines(result["search"], result["chosen_options"]), "```"]
    return "\n".join(lines) + "\n"
