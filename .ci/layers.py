"""Check the package's layers (DESIGN section 9): imports go downwards only, with no circles.

Layers, bottom to top: ``core`` (pure logic, no I/O) < ``redis`` < ``engine`` < ``celery`` <
the API modules at the top of the package (``config``, ``runtime``, ``frontend``, ...) <
``admin``, ``demo``, ``testing`` and the framework integrations. A module may import its own
layer and the layers below it; imports under ``if TYPE_CHECKING:`` count too (a type an engine
module needs from above is a Protocol of its own). Within the package, no module imports
another's ``_private`` names, and the modules imported at run time form no cycle.

Usage: ``python .ci/layers.py`` (exit 1 and a list of violations if any).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "oqron_cache"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
LAYERS = {"core": 0, "redis": 1, "engine": 2, "celery": 3}
API = 4
TOP = 5  # admin, demo, testing, integrations
TOP_PACKAGES = {"admin", "demo", "testing", "django", "fastapi", "flask"}
# Entry points that live beside their layer but configure the library: the top layer.
TOP_MODULES = {"oqron_cache.celery.worker"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if module in TOP_MODULES:
        return TOP
    if len(parts) == 1:
        return API  # the package's __init__ re-exports the API
    head = parts[1]
    if head in LAYERS:
        return LAYERS[head]
    if head in TOP_PACKAGES or head == "__main__":
        return TOP
    return API


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, modules: set[str]) -> list[tuple[str, bool, list[str], int]]:
    """``(target module, at run time?, names imported, line)`` for each import of ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, bool, list[str], int]] = []

    def visit(node: ast.AST, runtime: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                for sub in child.body:
                    visit_stmt(sub, False)
                for sub in child.orelse:
                    visit_stmt(sub, runtime)
            else:
                visit_stmt(child, runtime)

    def visit_stmt(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                names = [alias.name for alias in node.names]
                submodules = [n for n in names if f"{target}.{n}" in modules]
                for sub in submodules:
                    found.append((f"{target}.{sub}", runtime, [], node.lineno))
                rest = [n for n in names if n not in submodules]
                if rest or not submodules:
                    found.append((target, runtime, rest, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.append((alias.name, runtime, [], node.lineno))
        else:
            visit(node, runtime)

    visit(tree, True)
    return found


def main() -> int:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in paths:
        source = module_name(path)
        for target, runtime, names, line in imports(path, modules):
            if target not in modules:
                problems.append(f"{source}:{line}: imports {target}, which does not exist")
                continue
            if target == source:
                continue
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            if layer(target) > layer(source):
                problems.append(f"{where}: {source} (layer {layer(source)}) imports {target} "
                                f"(layer {layer(target)}): imports go downwards only")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{where}: imports private names {private} of {target}")
            if runtime:
                graph[source].add(target)
    problems += cycles(graph)
    for problem in problems:
        print(problem)
    if problems:
        print(f"\n{len(problems)} layering problem(s)")
        return 1
    print(f"layers: {len(modules)} modules, imports downwards only, no cycles")
    return 0


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """One line per import cycle found among run-time imports (package inits excluded: a
    package's ``__init__`` importing its own modules is not a cycle with them)."""
    found: list[str] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def edges(module: str) -> set[str]:
        # Importing a.b.c runs a/__init__ and a/b/__init__ first: not a dependency we check.
        return {t for t in graph[module] if not module.startswith(t + ".")}

    def walk(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges(module)):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                found.append("import cycle: " + " -> ".join(cycle))
            elif target not in state:
                walk(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)
    return found


if __name__ == "__main__":
    sys.exit(main())
