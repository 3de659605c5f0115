"""The layering of the code, read from its import statements (``ast``, nothing imported).

- ``api -> catalog <- workers``: the catalog imports neither the API nor the workers, the
  workers never import the API, and the API takes only the Celery names
  (``nds.workers.queues``) from the workers, never their Celery application or tasks.
- ``nds_client`` (the client distribution, the bottom layer) imports nothing of the server
  and none of the server's heavy dependencies; torch only in its optional manifest dataset.
- Plugins build on the contract (``nds.plugins.contract``), the model package and the
  client's shared modules, never on the catalog's other modules.
- The model package (``nds.catalog.model``) imports no SQL and no HTTP; the retrieval
  package's weighting and sampling modules import no SQL and nothing of the catalog.
- Sample data (``nds.samples``) is imported only by the demo, never by the product.
- No import cycle among all these modules: an import inside a function counts (it runs when
  called); one under ``if TYPE_CHECKING:`` does not (it never runs).
- The tests never import the benchmarks.
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


SQL = ("sqlalchemy", "sqlmodel", "psycopg", "alembic")
HTTP = ("httpx", "fastapi", "starlette", "uvicorn")
SERVER_ONLY = ("torch", "torchvision", "celery", "faiss", "psycopg", "sqlalchemy", "sqlmodel", "alembic", "fastapi", "qdrant_client",
               "qdrant_edge", "sklearn", "onnx", "onnxscript", "nds")


def _tops(name: str) -> set[str]:
    return {name.split(".")[0]}


def _breaks(rules: dict[str, tuple[str, ...]]) -> list[str]:
    """``module prefix -> forbidden import prefixes``: every (module, import) that breaks one."""
    broken = []
    for module, path in module_files().items():
        for prefix, forbidden in rules.items():
            if module == prefix or module.startswith(prefix + "."):
                for name in sorted(imported_names(module, path)):
                    if any(name == f or name.startswith(f + ".") for f in forbidden):
                        broken.append(f"{module} imports {name}")
    return broken


def test_the_client_imports_nothing_of_the_server() -> None:
    files = module_files()
    broken = []
    for module, path in files.items():
        if not module.startswith("nds_client"):
            continue
        # optional extras, imported where they are used: torch ([torch]), scikit-learn ([probe]),
        # onnx (read_metadata falls back to onnxruntime without it)
        allowed = {"nds_client.manifest_dataset": ("torch",), "nds_client.runtime": ("onnx",)}.get(module, ())
        if module.endswith("linear_probe"):
            allowed = ("sklearn",)
        for name in sorted(imported_names(module, path)):
            top = name.split(".")[0]
            if top in SERVER_ONLY and top not in allowed:
                broken.append(f"{module} imports {name}")
    assert not broken, "the client must install and run without the server:\n" + "\n".join(broken)


def test_plugins_build_on_the_contract_not_on_the_catalog() -> None:
    broken = []
    for module, path in module_files().items():
        if not module.startswith("nds.plugins"):
            continue
        for name in sorted(imported_names(module, path)):
            if name.startswith("nds.catalog") and not (name == "nds.catalog" or name.startswith("nds.catalog.model")):
                broken.append(f"{module} imports {name}")
            if name.startswith(("nds.api", "nds.workers", "nds.samples")):
                broken.append(f"{module} imports {name}")
    assert not broken, "plugins import nds.plugins.contract, nds.catalog.model and nds_client only:\n" + "\n".join(broken)


def test_the_model_package_imports_no_sql_and_no_http() -> None:
    broken = _breaks({"nds.catalog.model": (*SQL, *HTTP, "nds.api", "nds.workers", "nds.plugins", "nds.samples")})
    for module, path in module_files().items():
        if module.startswith("nds.catalog.model"):
            broken += [f"{module} imports {n}" for n in sorted(imported_names(module, path))
                       if n.startswith("nds.catalog.") and not n.startswith("nds.catalog.model")]
    assert not broken, "\n".join(broken)


def test_weighting_and_sampling_are_pure() -> None:
    names = ("nds.catalog.retrieval.weights", "nds.catalog.retrieval.sampling", "nds.catalog.retrieval.request", "nds.catalog.retrieval.recipe")
    pure = [m for m in module_files() if m in names]
    assert len(pure) == len(names), pure
    broken = _breaks({m: (*SQL, *HTTP, "nds.catalog.tables", "nds.catalog.db", "nds.catalog.context", "nds.api", "nds.workers") for m in pure})
    assert not broken, "\n".join(broken)


def test_sample_data_stays_out_of_the_product() -> None:
    broken = [b for b in _breaks({"nds.catalog": ("nds.samples",), "nds.workers": ("nds.samples",), "nds.plugins": ("nds.samples",),
                                  "nds_client": ("nds.samples",), "nds.api": ("nds.samples",)})
              if not b.startswith("nds.api.demo ")]
    assert not broken, "\n".join(broken)


def test_nothing_imports_the_folders_by_their_repository_names() -> None:
    """``from catalog...`` works from the repository root (it is on sys.path under pytest) and
    fails once installed, where the folders are nds.catalog, nds.api, ...: never write it."""
    folders = {folder.split("/")[0] for folder in PACKAGES if folder != "client/nds_client"} | {"migrations"}
    paths = [*module_files().items(), *(("tests." + p.stem, p) for p in sorted((ROOT / "tests").rglob("*.py"))),
             *(("benchmarks." + p.stem, p) for p in sorted((ROOT / "benchmarks").rglob("*.py")))]
    broken = [f"{path.relative_to(ROOT)} imports {name}" for module, path in paths
              for name in sorted(imported_names(module, path)) if name.split(".")[0] in folders]
    assert not broken, "import them as nds.<folder>:\n" + "\n".join(broken)


def test_tests_do_not_import_the_benchmarks() -> None:
    broken = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        module = "tests." + path.stem
        broken += [f"{path.name} imports {n}" for n in sorted(imported_names(module, path)) if n.split(".")[0] == "benchmarks"]
    assert not broken, "\n".join(broken)


def test_layers() -> None:
    broken = []
    for module, path in module_files().items():
        if not module.startswith("nds."):
            continue
        layer = module.removeprefix("nds.").split(".")[0]
        for name in imported_names(module, path):
            top = name.removeprefix("nds.").split(".")[0] if name.startswith("nds.") else name.split(".")[0]
            if layer == "catalog" and top in ("api", "workers"):
                broken.append(f"{module} imports {name}: the catalog knows nothing of the API or the workers")
            elif layer == "workers" and top == "api":
                broken.append(f"{module} imports {name}: the workers know nothing of the API")
            elif layer == "api" and top == "workers" and name not in ("nds.workers", "nds.workers.queues") and not name.startswith("nds.workers.queues."):
                broken.append(f"{module} imports {name}: the API takes only the Celery names (nds.workers.queues) from the workers")
    assert not broken, "\n".join(broken)


def test_jobs_does_not_import_the_kinds_it_runs() -> None:
    """The kinds register themselves (nds.catalog.job_kinds imports them); jobs looks them up."""
    graph = import_graph()
    assert not graph["nds.catalog.jobs"] & {"nds.catalog.registration", "nds.catalog.indexing", "nds.catalog.job_kinds"}
    assert {"nds.catalog.registration", "nds.catalog.indexing"} <= graph["nds.catalog.job_kinds"]
