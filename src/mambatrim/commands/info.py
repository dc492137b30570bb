"""``mambatrim info``: versions, devices and which scan backends work on this machine."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
from typing import Any

import torch

from ..ops import available_backends, get_backend

EXAMPLES = """examples:
  mambatrim info
  mambatrim info --json
"""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    from ..reduce import METHODS  # noqa: PLC0415 (imports every method)

    cuda = torch.cuda.is_available()
    return {
        "mambatrim": _version("mambatrim"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "cpu": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "scan_backends": available_backends(),
        "default_backend": {"cpu": get_backend("cpu"), **({"cuda": get_backend("cuda")} if cuda else {})},
        "methods": sorted(METHODS),
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("mambatrim", "python", "torch", "triton", "timm", "cpu"):
        print(f"{key:<16} {info[key] or 'not installed'}")
    print(f"{'cuda devices':<16} {', '.join(info['cuda_devices']) or 'none'}")
    print("scan backends:")
    for name, status in info["scan_backends"].items():
        print(f"  {name:<8} {status}")
    print(f"{'default backend':<16} " + ", ".join(f"{k}: {v}" for k, v in info["default_backend"].items()))
    print(f"{'methods':<16} {', '.join(info['methods']) or 'none registered'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="versions, devices and available scan backends",
        description="Show library versions, devices, the scan backends that work here and the registered "
                    "reduction methods.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)
