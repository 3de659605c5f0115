"""The REST API fuzzer: schemathesis against the app's own OpenAPI schema, authenticated.

The app runs in-process (ASGI) on a fresh embedded catalog holding two indexed synthetic
datasets (one of them restricted), their expert files and vectors, a stored query and a
client key; requests carry the admin key (``NDS_ADMIN_KEY``, which no request can revoke).
For each operation schemathesis generates ``examples`` requests that follow the schema
(positive) and as many that break it (negative: wrong types, missing fields, out-of-range
values). Every answer must be below 500, and every 4xx must be the project's JSON error
body (``detail``, ``field``, ``hint``). ``tests/test_fuzz.py`` runs it with few examples;
``python -m benchmarks.fuzz`` with many, printing a table per operation.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ADMIN_KEY = "fuzz-admin-key-" + "k" * 32


@dataclass
class OperationReport:
    label: str
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # up to 5 descriptions


@dataclass
class FuzzReport:
    operations: list[OperationReport]
    seconds: float

    @property
    def requests(self) -> int:
        return sum(op.requests for op in self.operations)

    @property
    def failures(self) -> list[str]:
        return [f"{op.label}: {f}" for op in self.operations for f in op.failures]


@contextmanager
def fuzz_app(work: Path) -> Iterator[tuple[object, dict[str, str]]]:
    """The app over a small but complete catalog, and the headers of an admin."""
    from fastapi.testclient import TestClient

    from nds.api.app import create_app
    from nds.catalog import access
    from nds.catalog.context import CatalogContext
    from nds.catalog.db import session_scope, upgrade
    from nds.catalog.retrieval.queries import run_query
    from nds.catalog.retrieval.request import QueryRequest
    from nds.catalog.settings import load_settings
    from nds.samples.synthetic import add_files_and_vectors, add_indexed_dataset

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    settings = load_settings(home=work / "home", data_roots=[data], database_url=None, qdrant_url=None, broker_url=None,
                             admin_key=ADMIN_KEY)
    upgrade(settings)
    with CatalogContext.open(settings) as ctx:
        a = add_indexed_dataset(ctx, "alpha", clusters=2, labels=["x", "y"], samples_per_group=3)
        b = add_indexed_dataset(ctx, "beta", clusters=2, labels=["x"], samples_per_group=3)
        add_files_and_vectors(ctx)
        with session_scope(ctx.engine) as session:
            access.create_key(session=session, name="client", role="client")
            access.set_access(session=session, dataset_id=b.dataset_id, restricted=True, keys=["client"])
        run_query(ctx, QueryRequest(expert_scores={e: 0.5 for e in a.expert_ids.values()}, budget=10))
    app = create_app(settings)
    with TestClient(app):  # runs the lifespan (opens the catalog) for the duration
        yield app, {"Authorization": f"Bearer {ADMIN_KEY}"}


def fuzz(app: object, headers: dict[str, str], *, examples: int, seed: int = 0) -> FuzzReport:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    reports: list[OperationReport] = []
    started = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        report = OperationReport(label=operation.label)
        reports.append(report)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case) -> None:  # noqa: ANN001 - a schemathesis Case
                response = case.call(headers=headers)
                report.requests += 1
                report.statuses[response.status_code] += 1
                problem = None
                if response.status_code >= 500:
                    problem = f"{response.status_code} for {case.method} {case.formatted_path}: {response.text[:200]}"
                elif response.status_code >= 400:
                    try:
                        body = response.json()
                        if not isinstance(body, dict) or "detail" not in body:
                            problem = f"{response.status_code} without the JSON error body: {response.text[:200]}"
                    except ValueError:
                        problem = f"{response.status_code} with a non-JSON body: {response.text[:200]}"
                if problem and len(report.failures) < 5:
                    report.failures.append(problem)

            try:
                run()
            except Unsatisfiable:
                pass  # nothing to break in this mode (an operation without parameters has no negative cases)
            except Exception as exc:  # an exception the app raised (the test client re-raises it) is a finding
                if len(report.failures) < 5:
                    report.failures.append(f"{mode.value} generation failed: {type(exc).__name__}: {str(exc)[:200]}")
    return FuzzReport(operations=reports, seconds=time.perf_counter() - started)
