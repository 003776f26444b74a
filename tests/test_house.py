"""The house's rules, checked on the source: no import circle among sparcom's modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sparcom"


def import_graph() -> dict[str, set[str]]:
    """Module -> the sparcom modules it imports, anywhere in it (an import inside a function still
    ties the two modules together)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparcom"):
                imported = [f"{node.module}.{alias.name}" for alias in node.names]
                found = [m for m in imported if m in modules]
                graph[name] |= set(found) if found else {node.module}
            elif isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_among_sparcoms_modules():
    graph = import_graph()
    assert len(graph) > 30 and graph["sparcom.config.checks"] >= {"sparcom.config", "sparcom.errors"}
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]
    ]  # the check finds one


def test_the_config_schema_and_the_errors_import_no_checks():
    graph = import_graph()
    assert graph["sparcom.errors"] == set()
    assert not graph["sparcom.config"] & {
        "sparcom.config.checks",
        "sparcom.config.messages",
        "sparcom.train.run_folder",
    }


def test_no_public_function_takes_more_than_eight_parameters():
    """Settings travel whole (the config's dataclasses, Edits, Recording, Selection, Loading), so no
    public function needs a long list of loose arguments that could be passed in the wrong order."""
    crowded = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                arguments = node.args
                names = [a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]]
                count = len([n for n in names if n not in ("self", "cls")])
                count += bool(arguments.vararg) + bool(arguments.kwarg)
                if count > 8:
                    crowded.append(f"{path.name}:{node.name} ({count})")
    assert crowded == []
