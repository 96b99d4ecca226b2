"""The package's shape (issue 15): no import cycles among raysys modules, and no function over 80
lines in the stage packages where the paper's concepts live."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "raysys"
MAX_FUNCTION_LINES = 80
SHORT_FUNCTION_PACKAGES = ("pretrain", "corpus", "evaluate")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(tree: ast.AST, modules: dict[str, Path], here: str) -> set[str]:
    """Every raysys module this one imports: at module level, inside functions (a lazy import is
    still a dependency) and under `if TYPE_CHECKING:` (a type that two modules need from each other
    belongs in a third)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                pkg = here.split(".")[: len(here.split(".")) - node.level + (1 if modules[here].name == "__init__.py" else 0)]
                base = ".".join([*pkg, node.module])
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    out.add(sub)
                elif base in modules:
                    out.add(base)
    out.discard(here)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(ast.parse(p.read_text()), modules, m) for m, p in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_walk_sees_real_imports():
    g = _graph()
    assert "raysys.contract" in g["raysys.config"] or "raysys.config" in g["raysys.cli"]
    assert len(g) > 30 and sum(len(v) for v in g.values()) > 50
    # and the cycle finder finds a planted cycle
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_long_functions_in_stage_packages():
    long = []
    for sub in SHORT_FUNCTION_PACKAGES:
        for p in sorted((PKG / sub).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{p.relative_to(PKG.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
