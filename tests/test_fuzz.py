"""schemathesis against the app's own OpenAPI schema: every endpoint, authenticated, positive
and negative cases; no 5xx, every 4xx with the JSON error body (`python -m benchmarks.fuzz` runs more)."""

from __future__ import annotations

import pytest

from tests.fuzzing import fuzz, fuzz_app

pytestmark = pytest.mark.slow  # the whole app under schemathesis: not in `make test-fast`

EXAMPLES = 15  # per operation and mode; `python -m benchmarks.fuzz` runs 200


def test_fuzz_every_endpoint(tmp_path, capsys):
    with fuzz_app(tmp_path) as (app, headers):
        report = fuzz(app, headers, examples=EXAMPLES)
    labels = {op.label for op in report.operations}
    assert {"POST /v1/queries", "GET /v1/queries/{query_id}/manifest", "POST /v1/datasets", "POST /v1/keys", "POST /v1/search"} <= labels
    assert report.requests > 10 * len(labels)
    with capsys.disabled():
        print(f"\nfuzz: {report.requests} requests over {len(labels)} operations in {report.seconds:.0f} s")
    assert not report.failures, "\n".join(report.failures)
