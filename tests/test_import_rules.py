"""The layering of the code, read from its import statements (``ast``, nothing imported).

``api -> catalog <- workers``: the catalog imports neither the API nor the workers, the
workers never import the API, and the API takes only the Celery names (``nds.workers.queues``)
from the workers, never their Celery application or tasks. No import cycle among the
modules of ``catalog/``, ``workers/`` and ``api/``: an import inside a function counts
(it runs when called); one under ``if TYPE_CHECKING:`` does not (it never runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder in the repository -> the import name it installs as
PACKAGES = {"catalog": "nds.catalog", "workers": "nds.workers", "api": "nds.api", "plugins": "nds.plugins",
            "samples": "nds.samples", "client/nds_client": "nds_client"}


def module_files() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts)))
            found[name] = path
    return found


def _runs(node: ast.AST) -> bool:
    """False for ``if TYPE_CHECKING:`` (its body never runs)."""
    test = getattr(node, "test", None)
    return not (isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")))


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports, at the top or in a function; for ``from X import
    a`` both ``X`` and ``X.a`` (``a`` may be a module)."""
    names: set[str] = set()
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            if _runs(child):
                visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return {n for n in names if n}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (the most specific one each name names)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in files:
                    targets.add(candidate)
                    break
        targets.discard(module)
        graph[module] = targets
    # ``from catalog import jobs`` names both the package and the module: keep the module
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not any(o.startswith(t + ".") for o in targets)}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, f"import cycles (each group imports itself through the others): {cycles}"


def test_the_cycle_finder_finds_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_layers() -> None:
    broken = []
    for module, path in module_files().items():
        layer = module.removeprefix("nds.").split(".")[0]
        for name in imported_names(module, path):
            top = name.removeprefix("nds.").split(".")[0] if name.startswith("nds.") else name.split(".")[0]
            if layer == "catalog" and top in ("api", "workers"):
                broken.append(f"{module} imports {name}: the catalog knows nothing of the API or the workers")
            elif layer == "workers" and top == "api":
                broken.append(f"{module} imports {name}: the workers know nothing of the API")
            elif layer == "api" and top == "workers" and name not in ("workers", "nds.workers.queues") and not name.startswith("nds.workers.queues."):
                broken.append(f"{module} imports {name}: the API takes only the Celery names (nds.workers.queues) from the workers")
    assert not broken, "\n".join(broken)


def test_jobs_does_not_import_the_kinds_it_runs() -> None:
    """The kinds register themselves (nds.catalog.job_kinds imports them); jobs looks them up."""
    graph = import_graph()
    assert not graph["nds.catalog.jobs"] & {"nds.catalog.registration", "nds.catalog.indexing", "nds.catalog.job_kinds"}
    assert {"nds.catalog.registration", "nds.catalog.indexing"} <= graph["nds.catalog.job_kinds"]
