"""``mambatrim compare MODEL``: dense vs reduction methods timed in one process (interleaved rounds)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..engine.benchmark import DTYPES, resolve_device
from ..engine.compare import MODES, compare, configuration, load_plan, to_markdown
from ..engine.report import write_result

EXAMPLES = """examples:
  mambatrim compare vim_small_patch16_224 --dtype bf16 --batch-size 128 \\
      --method rmeeto --method-opt ratio=0.31 --method top --method-opt keep=0.8 --method-opt align=hold
  mambatrim compare vim_small_patch16_224 --method dyvm --method-opt block_ratio=null \\
      --method dyvm --method-opt block_ratio=null --policy fused_row_gather=false --name "dyvm, PyTorch gather"
  mambatrim compare --config benchmarks/compare/dyvm.yaml --out benchmarks/results
  mambatrim compare vim_tiny_patch16_224 --device cpu --img-size 64 --batch-size 2 --rounds 2 --iters 1 \\
      --method rmeeto --method-opt ratio=0.3
timing: every round times every configuration once (the dense model included); rows report the median over
rounds, the speed-up over dense in the same mode and its per-round spread, FLOPs (paper convention) and
speed-up / FLOPs ratio. Default mode: CUDA graphs on a GPU, eager on a CPU.
"""
# run settings: (command-line default when neither the command line nor the plan gives one)
DEFAULTS: dict[str, Any] = dict(img_size=224, batch_size=None, dtype="bf16", device="auto", modes=None, rounds=5,
                                iters=10, warmup=10, stem="compare", title=None, model_kwargs=None)


class _Group(argparse.Action):
    """``--method`` starts a configuration; ``--method-opt`` / ``--policy`` / ``--name`` add to the last one."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: str | None = None) -> None:
        groups = getattr(namespace, "groups", None) or []
        if self.dest == "method":
            groups.append({"method": value, "options": [], "policy": []})
        elif not groups:
            parser.error(f"{option_string} belongs to a configuration: give --method NAME before it")
        elif self.dest == "name":
            groups[-1]["name"] = value
        else:
            groups[-1][self.dest].append(value)
        namespace.groups = groups


def _pairs(items: list[str], what: str) -> dict[str, Any]:
    from ..reduce import parse_method_options

    try:
        return parse_method_options(items)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    plan = load_plan(args.config) if args.config else {"configs": []}
    for group in args.groups or []:
        entry = {"method": group["method"], "options": _pairs(group["options"], "--method-opt"),
                 "policy": _pairs(group["policy"], "--policy")}
        if "name" in group:
            entry["name"] = group["name"]
        plan["configs"].append(configuration(entry))
    for key, default in DEFAULTS.items():
        given = getattr(args, key, None)
        plan[key] = given if given is not None else plan.get(key, default)
    plan["model"] = args.model or plan.get("model")
    if not plan["model"]:
        raise ValueError("no model: give MODEL or a --config plan with a 'model' key")
    if not plan["configs"]:
        raise ValueError("nothing to compare with dense: give --method NAME (repeatable) or --config FILE")
    return plan


def run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    batch = plan["batch_size"] or (128 if resolve_device(plan["device"]).type == "cuda" else 8)
    result = compare(plan["model"], plan["configs"], img_size=plan["img_size"], batch_size=batch,
                     dtype=plan["dtype"], device=plan["device"], modes=plan["modes"], rounds=plan["rounds"],
                     iters=plan["iters"], warmup=plan["warmup"], model_kwargs=plan["model_kwargs"],
                     log=lambda text: print(text, file=sys.stderr, flush=True))
    if args.config:
        result["plan"] = str(args.config)
    markdown = to_markdown(result, plan["title"])
    print(markdown)
    if args.out:
        write_result(args.out, plan["stem"], result, markdown)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="time dense vs reduction methods in one process (speed-up, FLOPs ratio)",
        description="Time the dense model and several reduction-method configurations in one process, in "
                    "interleaved rounds, and report images/s, speed-up over dense, FLOPs and speed-up / FLOPs "
                    "ratio. Configurations come from --method groups and/or a YAML plan (--config).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="model name (default: the plan's 'model')")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="comparison plan: run settings and a 'configs' list (see benchmarks/compare/)")
    parser.add_argument("--method", action=_Group, dest="method", metavar="NAME",
                        help="start a configuration with this reduction method (repeatable)")
    parser.add_argument("--method-opt", action=_Group, dest="options", metavar="KEY=VALUE",
                        help="option of the last --method (repeatable; YAML values, e.g. layers=[5,10,15])")
    parser.add_argument("--policy", action=_Group, dest="policy", metavar="SETTING=VALUE",
                        help="fast-path setting for the last --method's configuration only (see ops.policy)")
    parser.add_argument("--name", action=_Group, dest="name", help="row label of the last --method")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward (default 128 GPU, 8 CPU)")
    parser.add_argument("--img-size", type=int, default=None, help="input side in pixels (default 224)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="autocast precision (default bf16)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="cuda_graph and/or eager (default: cuda_graph on a GPU, eager on a CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5)")
    parser.add_argument("--iters", type=int, default=None, help="forwards per configuration and round (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards per configuration (default 10)")
    parser.add_argument("--out", default=None, metavar="DIR", help="write STEM.json and STEM.md into DIR")
    parser.add_argument("--stem", default=None, help="result file stem (default: the plan's, else 'compare')")
    parser.set_defaults(func=run, groups=[])
