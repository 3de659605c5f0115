"""The selection benchmark at test size: the server's selection must find the target's domain.

Runs ``benchmarks.selection`` with its ``--quick`` configuration: two real-image domains
(MNIST digits, texture patches; 60 images each) registered and indexed with the ``nds``
CLI, ``nds serve`` in a subprocess, the SDK scoring held-out targets of each domain and
querying budgets of 12 and 30 images; no transfer training. A change that breaks selection
quality (experts, scores, weights, sampling, manifests) makes precision fall to random's.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.selection import QUICK, RANDOM, run, write_outputs

pytestmark = pytest.mark.slow  # trains networks or runs processes: not in `make test-fast`


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = run(QUICK, echo=None)
    write_outputs(out, tmp_path_factory.mktemp("selection") / "results")
    return out


def _precisions(results, method):
    return [r["precision"] for r in results["runs"] if r["method"] == method]


@pytest.mark.parametrize("method", ["rotation", "embedding"])
def test_selection_beats_random(results, method):
    chosen = _precisions(results, method)
    random = _precisions(results, RANDOM)
    assert len(chosen) == len(QUICK.targets) * len(QUICK.budgets) * len(QUICK.seeds)
    # two domains: a random subset holds about half target-domain images
    assert 0.2 <= np.mean(random) <= 0.8
    assert np.mean(chosen) >= 0.8, results["scores"]
    assert min(chosen) >= 0.6, results["scores"]
    assert np.mean(chosen) - np.mean(random) >= 0.25


def test_every_method_selects_and_counts_add_up(results):
    budgets = set(results["budgets"])
    for r in results["runs"]:
        if r["method"] in QUICK.methods:
            assert r["budget"] in budgets
            assert 1 <= r["unique"] <= r["budget"]
            assert abs(sum(r["shares"].values()) - 1.0) < 1e-6
            assert r["shares"][r["target"]] == pytest.approx(r["precision"], abs=1e-4)  # shares are rounded to 4 places


def test_summary_and_markdown(results):
    from benchmarks.selection import markdown

    text = markdown(results)
    assert "| target | budget | method | precision | unique |" in text
    for target in QUICK.targets:
        assert f"| {target} |" in text
