"""Every benchmark and example calls qlowrank as it is today: the names it imports, the arguments it passes, the CLI flags.

A refactor that renames a module or a keyword breaks a benchmark only when it runs, which for some is 15 minutes
into measuring. This walks the syntax of benchmarks/*.py and examples/*.py (and the Python programs they hold in
string constants for `python -c`) instead: each name imported from qlowrank must exist, each call to something of
qlowrank's must bind to its `inspect.signature`, and the keywords a function passes on (`plan_run` and
`estimate_memory` to `spec_from_keywords`, `export_merged` to `ExportOptions`) must be ones the receiver takes.
Values returned by qlowrank's classes and annotated functions are followed through simple assignments, so
`plan = plan_run(...); plan.chosen` and `with MemoryProfiler() as p: p.report()` are checked too. CLI flags in
argument lists and in benchmarks/*.sh, examples/*.sh are checked against the command's argparse parser, and a
shell script's flags to a Python script against that script's own `add_argument` calls.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import inspect
import re
import subprocess
import types
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py")])
SHELL_SCRIPTS = sorted([*ROOT.glob("benchmarks/*.sh"), *ROOT.glob("examples/*.sh")])


@dataclasses.dataclass(frozen=True)
class Instance:
    """A value known to be an instance of one of qlowrank's classes (or a builtin one a function of qlowrank's
    is annotated to return)."""

    cls: type


@dataclasses.dataclass(frozen=True)
class Method:
    """A function looked up on an instance; `bound` when its first parameter is the instance (or class)."""

    function: typing.Callable
    bound: bool


@dataclasses.dataclass(frozen=True)
class Sibling:
    """Another script of the same folder, imported by name (`from vs_peft import build`): read, not imported."""

    path: Path

    def names(self) -> dict[str, object]:
        """Its top-level names: a function as its Signature, anything else as None."""
        found: dict[str, object] = {}
        for node in ast.parse(self.path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[node.name] = _signature(node.args)
            for target in _bound_names(node):
                found.setdefault(target, None)
        return found


def _bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return [n.id for t in targets if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)]


def _signature(arguments: ast.arguments) -> inspect.Signature:
    """The signature a `def` declares (defaults stand in as None: only the shape is checked)."""
    P = inspect.Parameter
    ordered = [*arguments.posonlyargs, *arguments.args]
    first_default = len(ordered) - len(arguments.defaults)
    parameters = [P(a.arg, P.POSITIONAL_ONLY if a in arguments.posonlyargs else P.POSITIONAL_OR_KEYWORD,
                    default=None if i >= first_default else P.empty) for i, a in enumerate(ordered)]
    if arguments.vararg:
        parameters.append(P(arguments.vararg.arg, P.VAR_POSITIONAL))
    parameters += [P(a.arg, P.KEYWORD_ONLY, default=P.empty if d is None else None)
                   for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults)]
    if arguments.kwarg:
        parameters.append(P(arguments.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(parameters)


def _ours(value: object) -> bool:
    name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None) or ""
    return name == "qlowrank" or name.startswith("qlowrank.")


def _spec_keyword_accepted(name: str) -> bool:
    """Whether spec_from_keywords takes `name`: it refuses an unknown one with TypeError before any value is read."""
    from qlowrank.config import spec_from_keywords

    try:
        spec_from_keywords(None, **{name: object()})
    except TypeError as error:
        return "unknown run options" not in str(error)
    except Exception:   # a known name with a nonsense value: refused by the field's own validation
        return True
    return True


@functools.cache
def _forwarded():
    """For each function with **keywords: a test of the names it passes on."""
    import qlowrank as ql
    from qlowrank.config import spec_from_keywords
    from qlowrank.export.entries import ExportOptions
    from qlowrank.memory.estimator import estimate_memory
    from qlowrank.planner import plan, plan_run

    planner_options = set(list(inspect.signature(plan).parameters)[2:])
    export_options = set(list(inspect.signature(ExportOptions).parameters)[2:])
    return {
        plan_run: lambda name: name in planner_options or _spec_keyword_accepted(name),
        estimate_memory: _spec_keyword_accepted,
        spec_from_keywords: _spec_keyword_accepted,
        ql.export_merged: lambda name: name in export_options,
    }


# Values whose attributes are all on their class: an annotation naming one is followed too (`tuple[...]` has no
# `.factors`), where a torch or transformers class may hold attributes that no class lookup finds.
BUILTINS = (tuple, list, dict, set, frozenset, str, bytes, int, float, bool)


def _annotated_class(hint: object) -> type | None:
    """The qlowrank or builtin class an annotation names (X, X[...], X | None, Optional[X]), if one."""
    if isinstance(hint, type) and _ours(hint):
        return hint
    if (typing.get_origin(hint) or hint) in BUILTINS:
        return typing.get_origin(hint) or hint
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    return _annotated_class(arguments[0]) if len(arguments) == 1 else None


def _returns(function: typing.Callable) -> Instance | None:
    try:
        cls = _annotated_class(typing.get_type_hints(function).get("return"))
    except Exception:   # an annotation naming something imported only for type checkers
        return None
    return Instance(cls) if cls else None


def _assigns_on_self(cls: type, attribute: str) -> bool:
    for klass in cls.__mro__:
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{attribute}\s*(:[^=]*)?=", source):
            return True
    return False


class Checker:
    """The problems of one Python program: `label` names it in messages."""

    def __init__(self, label: str, folder: Path, forwarded: dict):
        self.label, self.folder, self.forwarded, self.problems = label, folder, forwarded, []

    def problem(self, node: ast.AST, text: str) -> None:
        entry = f"{self.label}:{getattr(node, 'lineno', '?')}: {text}"
        if entry not in self.problems:
            self.problems.append(entry)

    # ---- scopes and names

    def run(self, tree: ast.Module) -> list[str]:
        """A pass records what each call of the script's own functions passes them; the next knows a parameter's
        class where every call passes an instance of the same one (`def show(estimate)`)."""
        defined = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        names = [n.name for n in defined]
        self.own = {n.name: n for n in defined if names.count(n.name) == 1}
        self.seeds: dict[str, dict[str, Instance]] = {}
        for _ in range(4):   # a seeded parameter passed on seeds the next function's: repeated until none is new
            self.passed: dict[str, dict[str, set]] = {}
            self.scope(tree, tree.body, {})
            seeds = {function: {name: kinds.pop() for name, kinds in passed.items()
                                if len(kinds) == 1 and isinstance(next(iter(kinds)), Instance)}
                     for function, passed in self.passed.items()}
            if seeds == self.seeds:
                break
            self.seeds = seeds
        return self.problems

    def record_arguments(self, node: ast.Call, env: dict) -> None:
        """What a call of one of the script's own functions passes each parameter."""
        function = self.own.get(node.func.id) if isinstance(node.func, ast.Name) and node.func.id not in env else None
        if function is None:
            return
        a = function.args
        names = [p.arg for p in [*a.posonlyargs, *a.args]]
        passed = self.passed.setdefault(function.name, {})
        if any(isinstance(x, ast.Starred) for x in node.args) or any(k.arg is None for k in node.keywords):
            for name in names + [p.arg for p in a.kwonlyargs]:
                passed.setdefault(name, set()).add(None)
            return
        given = [*zip(names, node.args), *((k.arg, k.value) for k in node.keywords)]
        for name, value in given:
            passed.setdefault(name, set()).add(self.resolve(value, env, report=False))
        for name in set(names + [p.arg for p in a.kwonlyargs]) - {n for n, _ in given}:
            passed.setdefault(name, set()).add(None)   # its default

    def scope(self, owner: ast.AST, body: list[ast.stmt], outer: dict) -> None:
        nodes = list(_scope_nodes(body))
        shadowed = _parameters(owner) | {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        shadowed |= {n.name for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        env = {k: v for k, v in outer.items() if k not in shadowed}
        if isinstance(owner, (ast.FunctionDef, ast.AsyncFunctionDef)) and self.own.get(owner.name) is owner:
            stored = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            env.update({k: v for k, v in self.seeds.get(owner.name, {}).items() if k not in stored})
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                self.imports(node, env)
        for _ in range(2):   # a typed name may be typed from another one
            env.update(self.typed_names(nodes, env))
        for node in nodes:
            if isinstance(node, ast.Call):
                self.record_arguments(node, env)
                self.call(node, env)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                self.resolve(node, env)
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                self.scope(node, node.body if isinstance(node.body, list) else [ast.Expr(node.body)], env)

    def imports(self, node: ast.Import | ast.ImportFrom, env: dict) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qlowrank":
                    module = self.module(node, alias.name)
                    if module is not None:
                        env[alias.asname or "qlowrank"] = module if alias.asname else importlib.import_module("qlowrank")
                elif (self.folder / f"{alias.name}.py").is_file():
                    env[alias.asname or alias.name] = Sibling(self.folder / f"{alias.name}.py")
            return
        if node.level == 0 and node.module and (self.folder / f"{node.module}.py").is_file():
            owner = Sibling(self.folder / f"{node.module}.py")
            for alias in node.names:
                env[alias.asname or alias.name] = self.member(node, owner, alias.name)
            return
        if node.level or not (node.module or "").split(".")[0] == "qlowrank":
            return
        module = self.module(node, node.module)
        for alias in node.names if module is not None else ():
            value = self.member(node, module, alias.name)
            if value is not None:
                env[alias.asname or alias.name] = value

    def module(self, node: ast.AST, name: str) -> types.ModuleType | None:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            self.problem(node, f"import {name}: {error}")
            return None

    def member(self, node: ast.AST, owner: object, name: str) -> object | None:
        """owner.name for a module or class of qlowrank's (a submodule imported on the way) or a sibling script's
        top-level name; None, reported, if absent."""
        if isinstance(owner, Sibling):
            names = owner.names()
            if name not in names:
                self.problem(node, f"{owner.path.name} defines no {name!r}")
            return names.get(name)
        if hasattr(owner, name):
            return getattr(owner, name)
        if isinstance(owner, types.ModuleType):
            try:
                return importlib.import_module(f"{owner.__name__}.{name}")
            except ModuleNotFoundError:
                pass
        self.problem(node, f"{getattr(owner, '__name__', owner)} has no attribute {name!r}")
        return None

    def typed_names(self, nodes: list[ast.AST], env: dict) -> dict:
        """Names bound in this scope only ever to instances of one qlowrank class."""
        kinds: dict[str, set] = {}
        for node in nodes:
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                kinds.setdefault(node.id, set()).add(None)
        for node in nodes:
            pairs = []
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                pairs = [(t, node.value) for t in targets]
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                pairs = [(item.optional_vars, item.context_expr) for item in node.items if item.optional_vars]
            for target, value in pairs:
                if isinstance(target, ast.Name):
                    kinds[target.id].discard(None)
                    kinds[target.id].add(self.resolve(value, env, report=False))
        return {name: found.pop() for name, found in kinds.items()
                if len(found) == 1 and isinstance(next(iter(found)), Instance)}

    # ---- expressions

    def resolve(self, node: ast.AST, env: dict, report: bool = True) -> object | None:
        """What an expression is, where it is qlowrank's: a module, class, function, Instance or Method."""
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self.resolve(node.value, env, report)
            if isinstance(owner, Instance):
                return self.instance_member(node, owner.cls, report)
            if isinstance(owner, Sibling):
                return self.member(node, owner, node.attr)
            if owner is None or isinstance(owner, Method) or not _ours(owner):
                return None
            if not report and not hasattr(owner, node.attr):
                return None
            return self.member(node, owner, node.attr)
        if isinstance(node, ast.Call):
            target = self.resolve(node.func, env, report=False)
            if isinstance(target, Method):
                return _returns(target.function)
            if isinstance(target, type) and _ours(target):
                return Instance(target)
            if callable(target) and _ours(target):
                return _returns(target)
        return None

    def instance_member(self, node: ast.Attribute, cls: type, report: bool) -> object | None:
        try:
            static = inspect.getattr_static(cls, node.attr)
        except AttributeError:
            static = None
        if isinstance(static, (staticmethod, classmethod)):
            return Method(static.__func__, isinstance(static, classmethod))
        if inspect.isfunction(static):
            return Method(static, True)
        if isinstance(static, property):
            return _returns(static.fget)
        hints = {}
        try:
            hints = typing.get_type_hints(cls)
        except Exception:
            pass
        if node.attr in hints:
            found = _annotated_class(hints[node.attr])
            return Instance(found) if found else None
        if static is None and not _assigns_on_self(cls, node.attr) and report:
            self.problem(node, f"{cls.__module__}.{cls.__qualname__} instances have no attribute {node.attr!r}")
        return None

    def call(self, node: ast.Call, env: dict) -> None:
        target = self.resolve(node.func, env)
        bound = False
        if isinstance(target, Method):
            target, bound = target.function, target.bound
        elif not isinstance(target, inspect.Signature) and not (callable(target) and _ours(target)):
            return
        try:
            signature = target if isinstance(target, inspect.Signature) else inspect.signature(target)
        except (TypeError, ValueError):
            return
        if bound:
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        spread = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
        positional = [None] * sum(not isinstance(a, ast.Starred) for a in node.args)
        keywords = {k.arg: None for k in node.keywords if k.arg is not None}
        name = getattr(target, "__qualname__", ast.unparse(node.func))
        try:
            arguments = (signature.bind_partial if spread else signature.bind)(*positional, **keywords).arguments
        except TypeError as error:
            self.problem(node, f"{name}{signature}: {error}")
            return
        extra = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        accepts = None if isinstance(target, inspect.Signature) else self.forwarded.get(target)
        for keyword in arguments.get(extra, {}) if accepts else ():
            if not accepts(keyword):
                self.problem(node, f"{name}(): keyword {keyword!r} is not one it passes on")


def _scope_nodes(body: list[ast.stmt]):
    """Every node of a scope's body; a nested function or lambda is yielded but not entered (its own scope)."""
    stack = list(reversed(body))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(node.decorator_list if not isinstance(node, ast.Lambda) else [])
            stack.extend(d for d in node.args.defaults + node.args.kw_defaults if d is not None)
            continue
        stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _parameters(owner: ast.AST) -> set[str]:
    if not isinstance(owner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        return set()
    a = owner.args
    return {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if p is not None}


def _programs(path: Path, root: Path = ROOT) -> list[tuple[str, ast.Module]]:
    """The file's syntax tree, and that of each string constant in it that is a Python program importing qlowrank."""
    tree = ast.parse(path.read_text(), filename=str(path))
    label = str(path.relative_to(root))
    programs = [(label, tree)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"^\s*(import|from) qlowrank",
                                                                                      node.value, re.M):
            programs.append((f"{label}:{node.lineno} (embedded program), line", ast.parse(node.value)))
    return programs


def api_problems(path: Path, root: Path = ROOT) -> list[str]:
    forwarded = _forwarded()
    return [p for label, tree in _programs(path, root) for p in Checker(label, path.parent, forwarded).run(tree)]


@functools.cache
def _command_options() -> dict[str, set[str]]:
    """Each `qlowrank` command's option strings, from the CLI's own parser."""
    from qlowrank.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: set(command._option_string_actions) for name, command in commands.items()}


def _flags(node: ast.AST | None) -> list[str]:
    """The `--flag` string constants in an expression (`--flag=value` as `--flag`)."""
    return [n.value.split("=")[0] for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value.startswith("--") and len(n.value) > 2] if node is not None else []


def _added_flags(nodes: list[ast.AST], assigned: bool) -> dict[str, list[str]]:
    """Per name, the flags a scope adds to it after building it (`x += [...]`, `x.append(...)`, `x.extend(...)`)
    and, if `assigned`, those it is built with (`x = [...]`)."""
    added: dict[str, list[str]] = {}
    for node in nodes:
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            added.setdefault(node.target.id, []).extend(_flags(node.value))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("append", "extend")
              and isinstance(node.func.value, ast.Name)):
            added.setdefault(node.func.value.id, []).extend(f for a in node.args for f in _flags(a))
        elif assigned and isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            added.setdefault(node.targets[0].id, []).extend(_flags(node.value))
    return added


def _command_in(items: list[ast.expr], commands: set[str]) -> int | None:
    """Where a qlowrank command name stands in an argument list: before any flag, with flags or a splice after it."""
    for i, item in enumerate(items):
        if isinstance(item, ast.Constant) and isinstance(item.value, str):
            if item.value.startswith("-") and item.value not in ("-m", "-c"):
                return None
            if item.value in commands and any(_flags(x) or isinstance(x, ast.Starred) for x in items[i + 1:]):
                return i
    return None


def _script_in(items: list[ast.expr], path: Path) -> tuple[int, Path] | None:
    """Where a script of this folder stands in an argument list (`__file__`, `here / "large_model.py"`), and which."""
    for i, item in enumerate(items):
        if any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(item)):
            return i, path
        named = [n.value for n in ast.walk(item) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and re.fullmatch(r"\w+\.py", n.value)]
        if named:
            return i, path.parent / named[0]
    return None


def cli_problems(path: Path, root: Path = ROOT) -> list[str]:
    """Flags in the script's argument lists that their receiver lacks: a qlowrank command, or a script of the same
    folder (the script itself re-run as a worker, or a sibling) whose parser's option strings are all constants."""
    options = _command_options()
    tree = ast.parse(path.read_text())
    problems = []
    everywhere = _added_flags(list(ast.walk(tree)), assigned=True)   # a list handed over as an argument
    scopes = [tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for body in scopes:
        nodes = list(_scope_nodes(body))
        spliced = {**everywhere, **_added_flags(nodes, assigned=True)}
        added = _added_flags(nodes, assigned=False)
        owners = {id(n.value): n.targets[0].id for n in nodes if isinstance(n, ast.Assign) and len(n.targets) == 1
                  and isinstance(n.targets[0], ast.Name)}
        for node in nodes:
            if not isinstance(node, (ast.List, ast.Tuple)):
                continue
            if (at := _command_in(node.elts, set(options))) is not None:
                receiver, known = f"qlowrank {node.elts[at].value}", options[node.elts[at].value]
            elif (script := _script_in(node.elts, path)) is not None:
                at, target = script
                receiver, known = target.name, _script_options(target) if target.is_file() else set()
            else:
                continue
            flags = [f for item in node.elts[at + 1:] for f in (
                spliced.get(item.value.id, []) if isinstance(item, ast.Starred) and isinstance(item.value, ast.Name)
                else _flags(item))]
            flags += added.get(owners.get(id(node)), [])
            problems += [f"{path.relative_to(root)}:{node.lineno}: {receiver} has no option {flag}"
                         for flag in dict.fromkeys(flags) if known is not None and flag not in known]
            complete = all(not isinstance(x.value, ast.Name) or x.value.id in spliced
                           for x in node.elts[at + 1:] if isinstance(x, ast.Starred))
            if receiver.startswith("qlowrank ") and complete:
                problems += [f"{path.relative_to(root)}:{node.lineno}: {receiver} needs {names[0]}"
                             for names in _required(receiver.split()[1]) if not set(names) & set(flags)]
    return problems


def _script_options(path: Path) -> set[str] | None:
    """The option strings a script's argparse parser declares; None if one is computed (not a constant) or the
    parser is built elsewhere (no add_argument here)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            if not all(isinstance(a, ast.Constant) for a in node.args):
                return None
            found |= {a.value for a in node.args}
    return found | {"-h", "--help"} if found else None


def _shell_flags(text: str) -> list[str]:
    return re.findall(r"(?<![\w$-])--[a-zA-Z][\w-]*", text)


def _shell_units(text: str) -> list[tuple[str | None, str]]:
    """(function name, its body) for each shell function, and (None, the rest); comments and heredocs out, lines
    joined."""
    text = re.sub(r"^\s*#.*$", "", text, flags=re.M)
    text = re.sub(r"<<-?'?(\w+)'?\n.*?\n\1\n", "\n", text, flags=re.S).replace("\\\n", " ")
    lines = []
    for line in text.splitlines():   # a newline inside single quotes (`bash -c '...'`) continues the line too
        open_quote = lines and re.search(r"-c\s+'[^']*$", lines[-1])
        lines[-1:] = [lines[-1] + " " + line] if open_quote else [*lines[-1:], line]
    text = "\n".join(lines)
    functions = [(m[1], m[2]) for m in re.finditer(r"^(\w+)\(\)\s*\{(.*?)^\}", text, re.S | re.M)]
    rest = re.sub(r"^(\w+)\(\)\s*\{(.*?)^\}", "", text, flags=re.S | re.M)
    return [*functions, (None, rest)]


def _invocations(text: str) -> list[tuple[str, list[str], bool]]:
    """(what is run, a `qlowrank` command or a script path; the flags given to it; whether they are all known) in a
    shell script: up to the end of its command, with arrays it expands, and for a function passing on "$@", once
    per call of the function with that call's flags."""
    units = _shell_units(text)
    top = units[-1][1]
    arrays = {m[1]: _shell_flags(m[2]) for m in re.finditer(r"(\w+)=\((.*?)\)", text, re.S)}
    found = []
    for function, body in units:
        for line in body.splitlines():
            for m in re.finditer(r"\bqlowrank\s+(\w+)|\b((?:benchmarks|examples)/\w+\.py)", line):
                command = re.split(r"\||;|&&|>|'|`|\)", line[m.end():])[0]
                flags = _shell_flags(command)
                passed = '"$@"' in command or "${@" in command
                expanded = [n for n in re.findall(r"\$\{(\w+)\[@\]\}", line[m.end():] if passed else command)]
                flags += [f for name in expanded for f in arrays.get(name, [])]
                calls = re.findall(rf"^\s*{function}\s+(.*)$", top, re.M) if passed and function else []
                target = m[1] or m[2]
                found += [(target, flags + _shell_flags(call), True) for call in calls] or [
                    (target, flags, not passed or bool(expanded))]
    return found


@functools.cache
def _required(command: str) -> list[list[str]]:
    """The option strings of each option a qlowrank command cannot run without: argparse's required ones, and
    those it checks itself and says so in their help ('... (required)')."""
    from qlowrank.cli.main import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return [a.option_strings for a in commands[command]._actions
            if a.option_strings and (a.required or (a.help or "").endswith("(required)"))]


def shell_problems(path: Path, root: Path = ROOT) -> list[str]:
    """Flags a shell script gives a qlowrank command or one of the Python scripts that the receiver lacks, and
    problems of the qlowrank-importing programs it runs with `python -c`."""
    options, problems = _command_options(), []
    for target, flags, complete in _invocations(path.read_text()):
        known = options.get(target) if "/" not in target else _script_options(root / target)
        if complete and target in options:
            problems += [f"{path.relative_to(root)}: qlowrank {target} needs {names[0]}, not given in {flags}"
                         for names in _required(target) if not set(names) & set(flags)]
        if known is None and "/" in target and not (root / target).is_file():
            problems.append(f"{path.relative_to(root)}: runs {target}, which does not exist")
        problems += [f"{path.relative_to(root)}: {target} has no option {flag}"
                     for flag in dict.fromkeys(flags) if known is not None and flag not in known]
    forwarded = _forwarded()
    for program in re.findall(r"""-c\s+(?:"([^"]*qlowrank[^"]*)"|'([^']*qlowrank[^']*)')""", path.read_text()):
        try:
            tree = ast.parse("".join(program))
        except SyntaxError:   # `bash -c '...'`: its qlowrank commands are among the invocations above
            continue
        problems += Checker(str(path.relative_to(root)), path.parent, forwarded).run(tree)
    return problems


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_calls_qlowrank_as_it_is(path):
    problems = api_problems(path)
    assert not problems, "\n".join(problems)


def test_the_refactor_broken_planner_benchmark_is_caught(tmp_path):
    """benchmarks/planner.py as of faad810 passed plan_run's quant, lora and seq_len positionally (the RunSpec
    refactor had made them keywords): it crashed after its measuring. The check must name that call."""
    old = subprocess.run(["git", "-C", str(ROOT), "show", "faad810:benchmarks/planner.py"], capture_output=True,
                         text=True)
    if old.returncode != 0:
        pytest.skip("faad810 is not in this checkout's history")
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "planner.py"
    script.write_text(old.stdout)
    problems = api_problems(script, tmp_path)
    assert any("plan_run" in p and "too many positional arguments" in p for p in problems), problems


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_passes_qlowrank_commands_flags_they_have(path):
    problems = cli_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_passes_flags_its_commands_have(path):
    problems = shell_problems(path)
    assert not problems, "\n".join(problems)


def test_a_flag_a_command_lacks_is_reported(tmp_path):
    """A removed flag in a shell function's "$@" calls, in a bash -c string fed an array, and in a Python
    argument list extended after it is built: each is named, and the flags the commands have are not. So is a
    call that leaves out an option the command needs (estimate's --model since the RunSpec refactor, c8be3f6:
    calibrate_vs_analytic.sh's SmolLM2 rows relied on a default model)."""
    (tmp_path / "benchmarks").mkdir()
    shell = tmp_path / "benchmarks" / "check.sh"
    shell.write_text("""run() { name="$1"; shift
  .venv/bin/qlowrank estimate --bits 4 --json "$@" > out.json
}
run "a row" --batch 4 --keep-attn off
ARGS=(--model m --seq 64 --no-such-flag)
bash -c '"$1" -m qlowrank profile "${@:2}" --steps 2' _ python "${ARGS[@]}"
""")
    script = tmp_path / "benchmarks" / "check.py"
    script.write_text("""import sys
command = [sys.executable, "-m", "qlowrank", "train", "--model", "m", "--steps", "2"]
command.append("--no-group-by-lengths")
""")
    assert sorted(p.split(": ", 1)[1] for p in shell_problems(shell, tmp_path)) == [
        "estimate has no option --keep-attn", "profile has no option --no-such-flag",
        "qlowrank estimate needs --model, not given in ['--bits', '--json', '--batch', '--keep-attn']"]
    assert [p.split(": ", 1)[1] for p in cli_problems(script, tmp_path)] == [
        "qlowrank train has no option --no-group-by-lengths"]
