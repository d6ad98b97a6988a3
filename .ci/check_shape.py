"""The shape rules of docs/architecture.md, checked in CI (``ruff`` checks function complexity):

- no module of ``htcgrid_executor/`` over 500 lines, no class over 400 (docstrings included);
- no import cycle in ``htcgrid_executor/`` or ``benchmarks/`` (imports inside functions count,
  those under ``if TYPE_CHECKING:`` do not);
- no import from the grid or the worker handler up to the executor layer;
- the grid's Redis key prefix ``htcgrid:`` spelt once in the package.

Exits 1 and names every breach.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE, MAX_CLASS = 500, 400
# the executor layer: what the grid and the worker handler must never import
EXECUTOR_SIDE = ("htcgrid_executor.executor", "htcgrid_executor._")
LOWER_LAYERS = ("htcgrid_executor.grid", "htcgrid_executor.worker")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, tree: ast.AST, modules: set[str]) -> set[str]:
    """The modules of the same tree that ``path`` imports, resolved to module names: for
    ``from package import module`` the module, for ``from module import name`` the module."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(block)}  # annotations only: no import at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            named = {f"{prefix}.{alias.name}" for alias in node.names} & modules
            found.update(named or {prefix})
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def check_tree(folder: str, problems: list[str], sizes: bool) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    modules = {module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        text = path.read_text()
        tree = ast.parse(text)
        if sizes:
            lines = len(text.splitlines())
            if lines > MAX_MODULE:
                problems.append(f"{path.relative_to(ROOT)}: {lines} lines (at most {MAX_MODULE})")
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_CLASS:
                        problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: class {node.name} is "
                                        f"{length} lines (at most {MAX_CLASS})")
        targets = {m for m in imports_of(path, tree, set(modules)) if m in modules and m != name}
        # a package's __init__ importing its own modules is how a package is made, not a cycle
        graph[name] = {m for m in targets if not (path.name == "__init__.py" and m.startswith(name + "."))}
        if name.startswith(LOWER_LAYERS):
            up = sorted(m for m in targets if m.startswith(EXECUTOR_SIDE))
            if up:
                problems.append(f"{path.relative_to(ROOT)}: the {name} layer imports up: {', '.join(up)}")
    # importing a package runs its __init__: count those edges too, except a package's own
    for name in list(graph):
        graph[name] |= {m.rpartition(".")[0] for m in graph[name]
                        if m.rpartition(".")[0] in modules and not name.startswith(m.rpartition(".")[0])}
    cycle = find_cycle(graph)
    if cycle:
        problems.append(f"{folder}: import cycle {' -> '.join(cycle)}")


def check_spelling(problems: list[str]) -> None:
    hits = [(p, n) for p in sorted((ROOT / "htcgrid_executor").rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if '"htcgrid:' in line or "'htcgrid:" in line
            or 'f"htcgrid:' in line]
    if len(hits) > 1:
        where = ", ".join(f"{p.relative_to(ROOT)}:{n}" for p, n in hits)
        problems.append(f"the key prefix 'htcgrid:' is spelt {len(hits)} times: {where}")


def main() -> int:
    problems: list[str] = []
    check_tree("htcgrid_executor", problems, sizes=True)
    check_tree("benchmarks", problems, sizes=False)
    check_spelling(problems)
    for problem in problems:
        print(f"check_shape: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
