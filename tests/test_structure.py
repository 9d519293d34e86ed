"""The package's import structure: no cycles, no private names across modules,
and a fallback for every standard-library module newer than requires-python.

These read the source with ``ast`` and import nothing from pyrovae, so they
also catch imports inside functions (the late imports that hide a cycle).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pyrovae"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` in ``module``."""
    if not node.level:
        return node.module or ""
    is_package = _modules()[module].name == "__init__.py"
    base = module.split(".")
    # ``from . import x`` in a package's __init__ means the package itself.
    drop = node.level - 1 if is_package else node.level
    base = base[: len(base) - drop] if drop else base
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> Iterator[Tuple[ast.stmt, str, List[str]]]:
    """(node, imported module, imported names) for every import in the file,
    at module level and inside functions alike."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            yield node, _resolve(module, node), [a.name for a in node.names]


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the pyrovae modules it imports.

    ``from pyrovae.x import y`` is an edge to ``pyrovae.x.y`` when that is a
    module, else to ``pyrovae.x``; ``import pyrovae.x`` is an edge to
    ``pyrovae.x``.
    """
    modules = _modules()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, target, names in _imports(name, path):
            if target != "pyrovae" and not target.startswith("pyrovae."):
                continue
            if not names:
                graph[name].add(target)
                continue
            for imported in names:
                sub = f"{target}.{imported}"
                graph[name].add(sub if sub in modules else target)
        graph[name].discard(name)
    return graph


def strongly_connected_components(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's algorithm, iterative (no recursion limit to worry about)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    components: List[List[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in graph:
                    continue
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def test_import_graph_sees_every_module():
    graph = import_graph()
    assert "pyrovae" in graph and "pyrovae.bench.runner" in graph
    # Sanity check of the parser itself: the top-level package imports downward.
    assert "pyrovae.models" in graph["pyrovae"]


def test_no_import_cycles():
    graph = import_graph()
    cycles = [c for c in strongly_connected_components(graph) if len(c) > 1]
    message = "\n".join(
        "cycle: "
        + ", ".join(c)
        + "\n    "
        + "\n    ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c)
        for c in cycles
    )
    assert not cycles, f"import cycles in pyrovae:\n{message}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_imports_across_modules():
    offenders = []
    for name, path in _modules().items():
        for node, target, names in _imports(name, path):
            if not (target == "pyrovae" or target.startswith("pyrovae.")):
                continue
            for imported in names:
                if _is_private(imported):
                    offenders.append(
                        f"{path.relative_to(ROOT)}:{node.lineno}: from {target} import {imported}"
                    )
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


# Standard-library modules added after the oldest Python that pyproject.toml
# allows, and the PyPI back-port that stands in for each one.
NEWER_STDLIB = {"tomllib": ((3, 11), "tomli")}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower()


def test_newer_stdlib_modules_have_a_fallback():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = tuple(int(p) for p in re.findall(r"\d+", project["requires-python"])[:2])
    dependencies = project.get("dependencies", [])
    used: Dict[str, List[str]] = {}
    for name, path in _modules().items():
        for node, target, _ in _imports(name, path):
            if target in NEWER_STDLIB:
                used.setdefault(target, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    problems = []
    for module, where in sorted(used.items()):
        since, backport = NEWER_STDLIB[module]
        if floor >= since:
            continue
        marked = [
            d
            for d in dependencies
            if _requirement_name(d) == backport and "python_version" in d.split(";", 1)[-1]
        ]
        if not marked:
            problems.append(
                f"{module} (Python {since[0]}.{since[1]}+) is imported at {', '.join(where)} "
                f"but requires-python is {project['requires-python']!r} and "
                f"{backport!r} is not a dependency with a python_version marker"
            )
        for spot in where:
            path, line = spot.rsplit(":", 1)
            source = (ROOT / path).read_text()
            if f"import {backport}" not in source:
                problems.append(f"{spot}: imports {module} with no fallback to {backport}")
    assert not problems, "\n".join(problems)
