"""Module boundaries of the package: what may import what at import time.

The graph is built from the source with ``ast``: an edge A -> B for every ``import`` of a
kvprof module that A runs when it is imported (module level, including ``if``/``try``
blocks and class bodies).  Imports inside functions are lazy by design and left out, as
are those under ``if TYPE_CHECKING:``.  Importing ``kvprof.x.y`` also initialises the
packages ``kvprof`` and ``kvprof.x``; those implicit edges are left out too (a package's
``__init__`` importing its own submodules is the ordinary shape, not a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package name it is installed as (pyproject.toml's package-dir)
PACKAGES = {"kvprof": ROOT / "kvprof", "kvprof.commands": ROOT / "commands"}
# modules that must import no other kvprof module at all, at any level
STANDALONE = ("kvprof.signals", "kvprof.owncode")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((pkg, *rel))
            if name.startswith("kvprof.commands") and pkg == "kvprof":
                continue  # not a folder of kvprof/ (commands/ is installed there)
            found[name] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_nodes(body):
    """The statements of ``body`` that run when the module is imported."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_time_nodes(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                yield from _import_time_nodes(inner)


def _resolve(name: str, modules: dict) -> str | None:
    """The deepest kvprof module that ``name`` (a dotted import target) names."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict, *, everywhere: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    nodes = ast.walk(tree) if everywhere else _import_time_nodes(tree.body)
    targets = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets.add(_resolve(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:  # `from kvprof import runtime`: the submodule itself
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in modules else _resolve(source, modules))
    targets.discard(None)
    targets.discard(module)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_graph_sees_the_imports_it_should():
    graph = _graph()
    assert "kvprof.runtime" in graph and "kvprof.commands" in graph
    assert "kvprof.signals" in graph["kvprof.trace.writer"]
    assert "kvprof.runtime" in graph["kvprof.probes"]  # `from kvprof import runtime`
    assert "kvprof.trace.writer" not in graph["kvprof.runtime"]  # imported inside functions only
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_at_module_level():
    cycles = _cycles(_graph())
    assert not cycles, (
        "modules that import each other at import time (move the shared part into a module of its own): "
        + "; ".join(" <-> ".join(c) for c in cycles)
    )


def test_the_trace_layer_imports_neither_the_runtime_nor_the_probes():
    """kvprof.runtime drives the writer; the writer never calls back up, lazily or not.
    What both need (the held signals, the SIGTERM rescue) lives in kvprof.signals."""
    modules = _modules()
    for name, path in modules.items():
        if name == "kvprof.trace" or name.startswith("kvprof.trace."):
            up = {
                m
                for m in _imports(name, path, modules, everywhere=True)
                if m == "kvprof.runtime" or m == "kvprof.probes" or m.startswith("kvprof.probes.")
            }
            assert not up, f"{name} imports {sorted(up)}"
    graph = _graph()
    graph["kvprof.runtime"].add("kvprof.trace.writer")  # so the runtime may import its writer at the top
    assert not _cycles(graph)


def test_standalone_modules_import_no_kvprof_module():
    modules = _modules()
    for name in STANDALONE:
        assert _imports(name, modules[name], modules, everywhere=True) == set(), name


def test_only_the_runtime_touches_its_hook_lists():
    """Probes register through runtime.on_exit / on_mark (and remove_exit_hook /
    remove_mark_hook), never through the lists behind them; nor do scripts the tests run."""
    private = ("_closers", "_mark_hooks")
    users = []
    for folder in (ROOT / "kvprof", ROOT / "commands", ROOT / "tests", ROOT / "benchmarks"):
        for path in sorted(folder.rglob("*.py")):
            if path in (ROOT / "kvprof" / "runtime.py", Path(__file__).resolve()):
                continue
            text = path.read_text(encoding="utf-8")
            if not any(name in text for name in private):
                continue
            for node in ast.walk(ast.parse(text, str(path))):
                if (
                    (isinstance(node, ast.Attribute) and node.attr in private)
                    or (isinstance(node, ast.ImportFrom) and any(a.name in private for a in node.names))
                    or (
                        isinstance(node, ast.Constant)
                        and isinstance(node.value, str)
                        and any(f".{name}" in node.value for name in private)
                    )
                ):  # code in a script a test writes
                    users.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not users, users
