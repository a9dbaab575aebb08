"""The package's layering: every import points down, no module imports in a circle, no private names cross modules.

The layers (ARCHITECTURE.md): config / version / atomic / state at the bottom, then nn, model,
adapter and data, export and memory, train, cli; the package root only re-exports. A module
may import from its own package or from a lower layer. Lazy imports inside functions count
too: a circle hidden in a function body is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qlowrank

PACKAGE_ROOT = Path(qlowrank.__file__).parent
LAYERS = {
    "config": 0, "version": 0, "atomic": 0, "heap": 0,
    "state": 0.5,                      # state records configs
    "nn": 1,
    "model": 2,
    "adapter": 3, "data": 3,
    "export": 4, "memory": 4,
    "train": 5, "planner": 5, "integrations": 5,
    "cli": 6,
    "__init__": 7, "__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


MODULES = _modules()


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> list[tuple[str, str, int]]:
    """(imported qlowrank module, imported name, line) for every import in `module`, lazy ones included."""
    path = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, _is_package(path))
            if target != "qlowrank" and not target.startswith("qlowrank."):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:          # `from . import quant`: the name is a module
                    found.append((submodule, "", node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("qlowrank")]
    return found


def layer_of(module: str) -> tuple[str, int]:
    """(top-level room, its layer) of a qlowrank module; the package root is `__init__`."""
    parts = module.split(".")
    room = parts[1] if len(parts) > 1 else "__init__"
    assert room in LAYERS, f"{module}: room {room!r} has no layer; add it to LAYERS and ARCHITECTURE.md"
    return room, LAYERS[room]


def test_every_room_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    room, layer = layer_of(module)
    for target, name, line in imports_of(module):
        target_room, target_layer = layer_of(target)
        if target_room == room:
            continue
        assert target_layer < layer, (
            f"{module}:{line} imports {target} ({target_room}, layer {target_layer}) from layer {layer} "
            f"({room}): an arrow that does not point down")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_modules(module):
    for target, name, line in imports_of(module):
        if target != module and name.startswith("_") and not name.startswith("__"):
            pytest.fail(f"{module}:{line} imports the private name {name!r} from {target}; make it public there")


def test_no_import_circles():
    graph = {m: {t for t, _, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}
    # A package's __init__ importing its own children is how re-exports work, not a circle.
    for m in graph:
        graph[m] = {t for t in graph[m] if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))}
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_a_bad_arrow(tmp_path):
    # The rules above must be able to fail: an import from nn up into train is caught.
    fake = ast.parse("from ..train.trainer import Trainer\nfrom ..model.load import _resolve\n")
    targets = [_resolve(n, "qlowrank.nn.lora", False) for n in ast.walk(fake) if isinstance(n, ast.ImportFrom)]
    assert targets == ["qlowrank.train.trainer", "qlowrank.model.load"]
    assert layer_of(targets[0])[1] > layer_of("qlowrank.nn.lora")[1]
