"""The size and naming rules: every function in qlowrank/ is at most 80 lines long and takes at most 10
parameters (`self` / `cls` aside), and module names are unique and shadow no standard-library module.

Beside tests/test_layering.py: the size rules the package keeps. A run's many choices travel as one
`RunSpec` (config.py), which is what keeps the estimator, planner and trainer under these limits.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qlowrank"
MAX_LINES = 80
MAX_PARAMETERS = 10


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE.parent), node


def _parameters(node: ast.FunctionDef) -> int:
    args = node.args
    named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    count = len(named) + bool(args.vararg) + bool(args.kwarg)
    return count - (1 if named and named[0].arg in ("self", "cls") else 0)


def test_every_function_is_short_and_takes_few_parameters():
    too_long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                for path, node in _functions() if node.end_lineno - node.lineno + 1 > MAX_LINES]
    too_wide = [f"{path}:{node.lineno} {node.name} ({_parameters(node)} parameters)"
                for path, node in _functions() if _parameters(node) > MAX_PARAMETERS]
    assert not too_long and not too_wide, "split these (a RunSpec carries a run's choices):\n" + "\n".join(
        too_long + too_wide)


def test_the_rule_sees_a_long_wide_function(tmp_path):
    """The walk itself: a 90-line, 11-parameter function is found by both measures."""
    source = "def f(" + ", ".join(f"a{i}" for i in range(11)) + "):\n" + "    x = 1\n" * 89
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef))
    assert node.end_lineno - node.lineno + 1 == 90 and _parameters(node) == 11


def test_module_names_say_one_thing():
    """No two modules in different rooms share a name, and none shadows a standard-library module
    (`import inspect` inside the room must mean the standard one)."""
    import sys
    from collections import Counter

    names = [path.stem for path in PACKAGE.rglob("*.py") if path.stem != "__init__"]
    twice = sorted(name for name, count in Counter(names).items() if count > 1)
    shadowing = sorted(set(names) & set(sys.stdlib_module_names))
    assert not twice and not shadowing, f"rename: shared {twice}, shadowing the standard library {shadowing}"
