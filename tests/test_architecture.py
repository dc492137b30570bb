"""The package's layering: the contract below models and methods, no import reaching up, no import loop.

Every ``import`` counts, also those inside functions (they hide upward reaches just as well).
"""
from __future__ import annotations

import ast
import pathlib

import mambatrim

ROOT = pathlib.Path(mambatrim.__file__).parent
# lowest first: a module may import its own area and the areas listed before it
LAYERS = ["_yaml", "validation", "ops", "contract", "models", "analysis", "reduce", "data", "engine", "commands",
          "cli", "__main__", "(root)"]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> list[tuple[str, str]]:
    """(importer, imported module) for every import of a mambatrim module."""
    edges = []
    for path in ROOT.rglob("*.py"):
        mod = module_name(path)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                for alias in node.names:  # `from . import x` imports module x where it is one
                    sub = f"{target}.{alias.name}"
                    is_module = (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                        (ROOT.parent / sub.replace(".", "/")).is_dir()
                    edges.append((mod, sub if is_module else target))
            elif isinstance(node, ast.Import):
                edges.extend((mod, alias.name) for alias in node.names)
    return [(a, b) for a, b in edges if b == "mambatrim" or b.startswith("mambatrim.")]


def area(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def test_no_import_reaches_up_a_layer() -> None:
    upward = [(a, b) for a, b in imports()
              if area(a) != area(b) and LAYERS.index(area(b)) > LAYERS.index(area(a))]
    assert not upward, f"imports reaching up a layer: {upward}"


def test_models_know_no_method_and_the_contract_knows_neither() -> None:
    edges = imports()
    assert not [(a, b) for a, b in edges if area(a) == "models" and area(b) == "reduce"]
    assert not [(a, b) for a, b in edges if area(a) == "contract" and area(b) in ("models", "reduce", "engine")]


def test_no_import_loop_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for a, b in imports():
        if a != b and not a.startswith(b + "."):  # a package's own __init__ is imported on the way in
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, f"import loop: {' -> '.join(cycle)}"


def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch) -> None:
    """The graph reader finds function-level and relative imports (a checker that saw nothing would pass)."""
    fake = tmp_path / "mambatrim"
    (fake / "models").mkdir(parents=True)
    (fake / "reduce").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "reduce" / "__init__.py").write_text("")
    (fake / "models" / "__init__.py").write_text("")
    (fake / "models" / "vim.py").write_text("def f():\n    from ..reduce import dyvm\n")
    (fake / "reduce" / "dyvm.py").write_text("from ..models import vim\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    edges = imports()
    assert ("mambatrim.models.vim", "mambatrim.reduce.dyvm") in edges
    assert ("mambatrim.reduce.dyvm", "mambatrim.models.vim") in edges
