"""The selection benchmark at test size: the server's selection must find the target's domain.

Runs ``python -m benchmarks.selection --quick`` as a user would (a command, not an import):
two real-image domains (MNIST digits, texture patches; 60 images each) registered and indexed
with the ``nds`` CLI, ``nds serve`` in a subprocess, the SDK scoring held-out targets of each
domain and querying budgets of 12 and 30 images; no transfer training. The test reads the
``results.json`` and ``results.md`` it writes. A change that breaks selection quality
(experts, scores, weights, sampling, manifests) makes precision fall to random's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains networks or runs processes: not in `make test-fast`

ROOT = Path(__file__).resolve().parent.parent
RANDOM = "random"  # the benchmark's name for a uniform draw from the pool


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("selection") / "results"
    done = subprocess.run([sys.executable, "-m", "benchmarks.selection", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    data["markdown"] = (out / "results.md").read_text()
    return data


def _precisions(results, method):
    return [r["precision"] for r in results["runs"] if r["method"] == method]


@pytest.mark.parametrize("method", ["rotation", "embedding"])
def test_selection_beats_random(results, method):
    config = results["config"]
    chosen = _precisions(results, method)
    random = _precisions(results, RANDOM)
    assert len(chosen) == len(config["targets"]) * len(config["budgets"]) * len(config["seeds"])
    # two domains: a random subset holds about half target-domain images
    assert 0.2 <= np.mean(random) <= 0.8
    assert np.mean(chosen) >= 0.8, results["scores"]
    assert min(chosen) >= 0.6, results["scores"]
    assert np.mean(chosen) - np.mean(random) >= 0.25


def test_every_method_selects_and_counts_add_up(results):
    budgets = set(results["budgets"])
    for r in results["runs"]:
        if r["method"] in results["config"]["methods"]:
            assert r["budget"] in budgets
            assert 1 <= r["unique"] <= r["budget"]
            assert abs(sum(r["shares"].values()) - 1.0) < 1e-6
            assert r["shares"][r["target"]] == pytest.approx(r["precision"], abs=1e-4)  # shares are rounded to 4 places


def test_summary_and_markdown(results):
    text = results["markdown"]
    assert "| target | budget | method | precision | unique |" in text
    for target in results["config"]["targets"]:
        assert f"| {target} |" in text
