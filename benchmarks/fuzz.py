"""Fuzz every endpoint of the REST API from its own OpenAPI schema (schemathesis), authenticated.

    .venv/bin/python -m benchmarks.fuzz [--examples 200]

The app runs in-process (ASGI) on a fresh embedded catalog holding two indexed synthetic
datasets (one of them restricted), their expert files and vectors, a stored query and a
client key; requests carry the admin key (``NDS_ADMIN_KEY``, which no request can revoke).
For each operation schemathesis generates ``--examples`` requests that follow the schema
(positive) and as many that break it (negative: wrong types, missing fields, out-of-range
values). Every answer must be below 500, and every 4xx must be the project's JSON error
body (``detail``, ``field``, ``hint``). A table per operation and the totals are printed;
The fuzzer itself is ``tests/fuzzing.py``; ``tests/test_fuzz.py`` runs it with fewer examples in ``make test``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.fuzzing import fuzz, fuzz_app


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="generated requests per operation and mode (positive, negative)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nds-fuzz-") as tmp, fuzz_app(Path(tmp)) as (app, headers):
        report = fuzz(app, headers, examples=args.examples)
    console = Console(width=None if sys.stdout.isatty() else 150)
    table = Table(title=f"schemathesis against the app's OpenAPI schema, up to {args.examples} positive + {args.examples} negative cases per operation")
    for col in ("operation", "requests", "statuses", "failures"):
        table.add_column(col, justify="left" if col in ("operation", "statuses") else "right")
    for op in report.operations:
        table.add_row(op.label, f"{op.requests:,}", ", ".join(f"{k}: {v}" for k, v in sorted(op.statuses.items())), str(len(op.failures)))
    table.caption = f"{report.requests:,} requests in {report.seconds:.0f} s; 5xx or 4xx without a JSON error body: {len(report.failures)}"
    console.print(table)
    for failure in report.failures:
        console.print(f"[red]{failure}[/]", highlight=False)
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
