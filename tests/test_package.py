"""The package's shape: no import circles between its modules, counting the imports inside functions too."""

import ast
from pathlib import Path

import meissonic

PACKAGE = Path(meissonic.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (at the top or in a function)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {target for target in found if target in names and target != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each chain of imports that leads from a module back to itself, once (depth-first, from every module)."""
    found, seen = [], set()

    def visit(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                loop = path[path.index(nxt):]
                key = frozenset(loop)
                if key not in seen:
                    seen.add(key)
                    found.append(loop + [nxt])
            elif len(path) < 12:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_through_others():
    graph = module_imports()
    assert "meissonic.training.common" in graph["meissonic.training.train"]  # the graph sees relative imports
    assert "meissonic.loading" in graph["meissonic.training.common"]  # ... and imports inside functions
    assert circles(graph) == []
