"""Weighted retrieval: the formulas, both sampling modes, reproducibility, bad input, manifests."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from nds.catalog.retrieval.manifest import iter_manifest
from nds.catalog.retrieval.queries import run_query
from nds.catalog.retrieval.request import DEFAULT_TEMPERATURE, QueryRequest
from nds.catalog.retrieval.sampling import sample_groups
from nds.catalog.retrieval.weights import normalized_scores, softmax
from nds.catalog.tables import Query
from nds.samples.synthetic import add_indexed_dataset
from nds_client.errors import InvalidInputError
from tests.conftest import LOOPBACK


@pytest.fixture
def catalog(ctx):
    """Two synthetic indexed datasets: A (3 clusters x labels x,y) and B (2 clusters x labels x,z), unequal sizes."""
    a = add_indexed_dataset(ctx, "A", clusters=3, labels=["x", "y"], sizes=np.array([[30, 10], [5, 5], [40, 20]]))
    b = add_indexed_dataset(ctx, "B", clusters=2, labels=["x", "z"], sizes=np.array([[8, 12], [50, 0]]))
    return ctx, a, b


def expected_group_mass(scores: dict[tuple[str, int], float], sizes: dict, priors: dict | None, temperature: float) -> dict:
    """The README's formula, by hand, per (dataset, cluster, label)."""
    keys = sorted(scores)
    s = np.array([scores[k] for k in keys])
    s = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.ones_like(s)
    p = np.exp(s / temperature) / np.exp(s / temperature).sum()
    p_of = dict(zip(keys, p))
    mass = {}
    for (ds, c, lab), n in sizes.items():
        if (ds, c) not in p_of or n == 0:
            continue
        cluster_size = sum(m for (d2, c2, _), m in sizes.items() if (d2, c2) == (ds, c))
        w = p_of[(ds, c)] / cluster_size
        if priors and ds in priors:
            ds_total = sum(m for (d2, _, _), m in sizes.items() if d2 == ds)
            ps = sum(m for (d2, _, l2), m in sizes.items() if d2 == ds and l2 == lab) / ds_total
            w *= priors[ds].get(lab, 0.0) / ps
        mass[(ds, c, lab)] = w * n
    total = sum(mass.values())
    return {k: v / total for k, v in mass.items()}


def sizes_of(a, b) -> dict:
    out = {}
    for d in (a, b):
        for (c, lab), n in d.group_sizes.items():
            out[(d.name, c, lab)] = n
    return out


def empirical(ctx, query: Query) -> dict:
    counts: dict = {}
    for chunk in iter_manifest(ctx, query):
        for r in chunk:
            key = (r.dataset, r.cluster, r.label)
            counts[key] = counts.get(key, 0) + r.count
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


def test_normalisation_and_softmax():
    assert np.allclose(normalized_scores(np.array([0.3, 0.3, 0.3])), 1.0)  # equal scores: no division by zero
    assert np.allclose(normalized_scores(np.array([0.25, 0.5, 0.75])), [0, 0.5, 1])
    p = softmax(normalized_scores(np.array([0.30, 0.52, 0.55])), DEFAULT_TEMPERATURE)
    assert p.argmax() == 2 and 0.3 < p[1] / p[2] < 1  # close scores share the mass: the default does not collapse
    assert p[0] < 1e-3


@pytest.mark.parametrize("with_priors", [False, True])
def test_group_masses_match_the_formula_over_many_seeds(catalog, with_priors):
    ctx, a, b = catalog
    raw = {("A", 0): 0.6, ("A", 1): 0.3, ("A", 2): 0.55, ("B", 0): 0.5}  # B's cluster 1 is not scored: no mass
    scores = {{"A": a, "B": b}[ds].expert_ids[c]: v for (ds, c), v in raw.items()}
    priors = {"A": {"x": 0.2, "y": 0.8}} if with_priors else None
    expected = expected_group_mass(raw, sizes_of(a, b), priors, DEFAULT_TEMPERATURE)
    budget, seeds = 4000, 25
    total: dict = {}
    for seed in range(seeds):
        q = run_query(ctx, QueryRequest(expert_scores=scores, label_priors={a.dataset_id: priors["A"]} if priors else None,
                                        budget=budget, seed=seed))
        for k, v in empirical(ctx, q).items():
            total[k] = total.get(k, 0) + v / seeds
        # the stored summary states the same masses
        masses = {(d["dataset"], c["cluster"]): c["mass"] for d in q.summary["datasets"] for c in d["clusters"]}
        for (ds, c) in {(k[0], k[1]) for k in expected}:
            assert masses[(ds, c)] == pytest.approx(sum(v for k, v in expected.items() if k[:2] == (ds, c)), abs=1e-5)
    assert set(total) <= set(expected)
    # tolerance: 4 standard errors of a multinomial share over budget*seeds draws
    n = budget * seeds
    for key, p in expected.items():
        se = (p * (1 - p) / n) ** 0.5
        assert abs(total.get(key, 0.0) - p) <= 4 * se + 1e-9, (key, total.get(key), p)
    assert ("B", 1, "x") not in total  # unscored cluster gets nothing


def test_priors_alone_and_equal_scores(catalog):
    ctx, a, b = catalog
    q = run_query(ctx, QueryRequest(label_priors={a.dataset_id: {"x": 1.0, "y": 0.0}}, budget=500, seed=1))
    emp = empirical(ctx, q)
    assert set(emp) <= {("A", c, "x") for c in range(3)}  # only label x of dataset A
    equal = {e: 0.4 for e in list(a.expert_ids.values())}
    q = run_query(ctx, QueryRequest(expert_scores=equal, budget=3000, seed=2))
    emp = empirical(ctx, q)
    # equal scores: every scored cluster gets the same mass
    per_cluster = {c: sum(v for k, v in emp.items() if k[1] == c) for c in range(3)}
    assert all(abs(v - 1 / 3) < 0.05 for v in per_cluster.values())


def test_reproducible_and_seed_sensitive(catalog):
    ctx, a, b = catalog
    scores = {a.expert_ids[0]: 0.5, b.expert_ids[0]: 0.45}
    rows = lambda q: [r.as_dict() for chunk in iter_manifest(ctx, q) for r in chunk]  # noqa: E731
    q1 = run_query(ctx, QueryRequest(expert_scores=scores, budget=200, seed=7))
    q2 = run_query(ctx, QueryRequest(expert_scores=scores, budget=200, seed=7))
    q3 = run_query(ctx, QueryRequest(expert_scores=scores, budget=200, seed=8))
    assert rows(q1) == rows(q2) and rows(q1) != rows(q3)


def test_without_replacement_spills_over_and_caps(catalog):
    ctx, a, b = catalog
    scores = {a.expert_ids[1]: 1.0, a.expert_ids[0]: 0.0}  # cluster 1 (10 samples) has almost all the mass
    q = run_query(ctx, QueryRequest(expert_scores=scores, budget=30, replacement=False, seed=3))
    rows = [r for chunk in iter_manifest(ctx, q) for r in chunk]
    assert all(r.count == 1 for r in rows) and len({r.key for r in rows}) == 30
    assert sum(1 for r in rows if r.cluster == 1) == 10  # the favoured cluster is used up, the rest spills over
    q = run_query(ctx, QueryRequest(expert_scores=scores, budget=1000, replacement=False, seed=3))
    assert q.summary["selected"] == 50 and q.summary["samples_with_weight"] == 50
    assert any("capped at 50" in note for note in q.summary["notes"])


def test_with_replacement_repeats(catalog):
    ctx, a, b = catalog
    q = run_query(ctx, QueryRequest(expert_scores={a.expert_ids[1]: 1.0}, budget=100, seed=0))
    rows = [r for chunk in iter_manifest(ctx, q) for r in chunk]
    assert sum(r.count for r in rows) == 100 and len(rows) <= 10 and q.summary["unique_samples"] == len(rows)
    assert q.summary["effective_sample_size"] == pytest.approx(10.0)


def test_sampler_is_o_g_plus_b():
    """The sampler never looks at samples: a billion-sample table costs the same as a small one."""
    from nds.catalog.retrieval.weights import GroupTable

    sizes = np.full(1000, 10**6, dtype=np.int64)
    table = GroupTable(np.zeros(1000, np.int64), np.arange(1000), [None] * 1000, sizes, np.full(1000, 1e-3))
    picks = sample_groups(table, 5000, replacement=False, seed=0)
    assert picks.count.sum() == 5000 and picks.rank.max() < 10**6


@pytest.mark.parametrize("big", [False, True])
def test_sampler_picks_are_sorted_unique_and_uniform_inside_groups(big):
    """Each (group, rank) once, sorted, counts adding up to the budget; ranks uniform inside a group.
    ``big``: more than 2**31 samples in all, so positions no longer fit int32."""
    from nds.catalog.retrieval.weights import GroupTable

    sizes = np.array([7, 1, 50, 3_000_000_000 if big else 20], dtype=np.int64)
    table = GroupTable(np.zeros(4, np.int64), np.arange(4), [None] * 4, sizes, np.array([0.3, 0.1, 0.4, 0.2]))
    budget = 20_000
    picks = sample_groups(table, budget, replacement=True, seed=5)
    group = picks.group
    assert picks.count.sum() == budget and picks.selected.sum() == budget
    assert np.array_equal(np.bincount(group, minlength=4), picks.unique)
    assert np.array_equal(np.bincount(group, weights=picks.count, minlength=4).astype(np.int64), picks.selected)
    key = group * 2**40 + picks.rank
    assert np.all(np.diff(key) > 0)  # sorted by (group, rank), no repeats
    assert np.all(picks.rank >= 0) and np.all(picks.rank < sizes[group])
    assert picks.unique[1] == 1  # the one-sample group: every draw is rank 0
    # ranks inside group 2 (50 samples, ~8,000 draws): every rank drawn, counts within 5 sigma of uniform
    inside = np.zeros(50)
    inside[picks.rank[group == 2]] = picks.count[group == 2]
    n = inside.sum()
    assert np.all(np.abs(inside - n / 50) < 5 * np.sqrt(n / 50))


def test_bad_input_stores_nothing(catalog):
    ctx, a, b = catalog
    good = {a.expert_ids[0]: 0.5}
    cases = [
        (dict(expert_scores={99999: 0.5}), "expert_scores"),
        (dict(expert_scores={a.expert_ids[0]: float("nan")}), f"expert_scores.{a.expert_ids[0]}"),
        (dict(expert_scores={a.expert_ids[0]: float("inf")}), f"expert_scores.{a.expert_ids[0]}"),
        (dict(expert_scores={a.expert_ids[0]: -0.1}), f"expert_scores.{a.expert_ids[0]}"),
        (dict(expert_scores=good, label_priors={a.dataset_id: {"x": -0.5, "y": 1.5}}), f"label_priors.{a.dataset_id}"),
        (dict(expert_scores=good, label_priors={a.dataset_id: {"x": 0.5, "y": 0.4}}), f"label_priors.{a.dataset_id}"),
        (dict(expert_scores=good, label_priors={a.dataset_id: {"x": 0.5, "q": 0.5}}), f"label_priors.{a.dataset_id}"),
        (dict(expert_scores=good, budget=0), "budget"),
        (dict(expert_scores=good, budget=10**12), "budget"),
        (dict(expert_scores=good, datasets=[b.dataset_id]), "datasets"),
        (dict(expert_scores=good, temperature=0.0), "temperature"),
        (dict(), "expert_scores"),
    ]
    for kwargs, field in cases:
        kwargs.setdefault("budget", 10)
        with pytest.raises(InvalidInputError) as info:
            run_query(ctx, QueryRequest(**kwargs))
        assert info.value.field == field, (kwargs, info.value.field, info.value)
    with Session(ctx.engine) as session:
        assert session.exec(select(Query)).all() == []
    assert not (ctx.artifacts.root / "queries").exists()


def test_recommendation(catalog):
    ctx, a, b = catalog
    small = run_query(ctx, QueryRequest(expert_scores={a.expert_ids[0]: 0.8}, budget=10, target_size=200, score_method="rotation"))
    assert small.summary["recommendation"]["recipe"] == "linear-probe"
    far = run_query(ctx, QueryRequest(expert_scores={a.expert_ids[0]: 0.3}, budget=10, target_size=200, score_method="rotation"))
    assert far.summary["recommendation"]["recipe"] == "linear-probe-early-layers"
    big = run_query(ctx, QueryRequest(expert_scores={a.expert_ids[0]: 0.3}, budget=10, target_size=5000))
    assert big.summary["recommendation"]["recipe"] == "fine-tune"
    assert all(r["recommendation"]["reason"].endswith(".") for r in (small.summary, far.summary, big.summary))
    # embedding scores are shares of the target per cluster: a domain's clusters vote together
    split = {a.expert_ids[0]: 0.2, a.expert_ids[1]: 0.2, a.expert_ids[2]: 0.2, b.expert_ids[0]: 0.4}
    close = run_query(ctx, QueryRequest(expert_scores=split, budget=10, target_size=200, score_method="embedding"))
    assert close.summary["recommendation"]["recipe"] == "linear-probe"
    assert "0.60 of the target nearest the clusters of 'A'" in close.summary["recommendation"]["reason"]
    spread = {a.expert_ids[0]: 0.2, a.expert_ids[1]: 0.2, b.expert_ids[0]: 0.3}  # the rest nearest other datasets' clusters
    scattered = run_query(ctx, QueryRequest(expert_scores=spread, budget=10, target_size=200, score_method="embedding"))
    assert scattered.summary["recommendation"]["recipe"] == "linear-probe-early-layers"
    # rotation scores count expert by expert, never summed
    summed = run_query(ctx, QueryRequest(expert_scores={a.expert_ids[0]: 0.3, a.expert_ids[1]: 0.3}, budget=10, target_size=200, score_method="rotation"))
    assert summed.summary["recommendation"]["recipe"] == "linear-probe-early-layers"


def test_rest_queries_and_manifest_formats(settings, catalog):
    from nds.api.app import create_app

    ctx, a, b = catalog
    with TestClient(create_app(settings), base_url=LOOPBACK) as api:
        body = {"expert_scores": {str(a.expert_ids[0]): 0.6, str(b.expert_ids[0]): 0.5}, "budget": 300, "seed": 4}
        created = api.post("/v1/queries", json=body)
        assert created.status_code == 201, created.text
        qid = created.json()["id"]
        summary = created.json()["summary"]
        assert summary["selected"] == 300 and summary["recommendation"]["reason"]
        assert api.get(f"/v1/queries/{qid}").json()["summary"] == summary
        page = api.get(f"/v1/queries/{qid}/samples", params={"offset": 2, "limit": 5}).json()
        assert len(page["data"]) == 5 and page["count"] == summary["unique_samples"]

        csv_bytes = api.get(f"/v1/queries/{qid}/manifest", params={"format": "csv"}).content
        jsonl = api.get(f"/v1/queries/{qid}/manifest", params={"format": "jsonl"}).content
        parquet = api.get(f"/v1/queries/{qid}/manifest", params={"format": "parquet"}).content
        df_csv = pd.read_csv(io.BytesIO(csv_bytes), keep_default_na=False)
        df_jsonl = pd.read_json(io.BytesIO(jsonl), lines=True)
        df_pq = pq.read_table(io.BytesIO(parquet)).to_pandas()
        assert list(df_csv.columns) == ["key", "uri", "label", "dataset", "cluster", "weight", "count", "shard", "offset", "size"]
        assert list(df_pq.columns) == list(df_csv.columns) and set(df_csv["shard"]) == {""}  # plain files: no container
        assert df_csv["count"].sum() == df_jsonl["count"].sum() == df_pq["count"].sum() == 300
        assert list(df_csv["key"]) == list(df_jsonl["key"]) == list(df_pq["key"])
        assert np.allclose(df_csv["weight"], df_pq["weight"])
        again = api.post("/v1/queries", json=body).json()["id"]
        assert api.get(f"/v1/queries/{again}/manifest").content == csv_bytes  # byte for byte

        bad = api.get(f"/v1/queries/{qid}/manifest", params={"format": "xlsx"})
        assert bad.status_code == 422 and bad.json()["field"] == "format" and "csv" in bad.json()["detail"]
        for payload, field in [
            ({**body, "budget": 0}, "budget"),
            ({**body, "expert_scores": {"999999": 0.5}}, "expert_scores"),
            ({**body, "expert_scores": {str(a.expert_ids[0]): -1}}, f"expert_scores.{a.expert_ids[0]}"),
            ({**body, "datasets": [999]}, "datasets"),
            ({**body, "label_priors": {str(a.dataset_id): {"x": 0.7}}}, f"label_priors.{a.dataset_id}"),
        ]:
            resp = api.post("/v1/queries", json=payload)
            assert resp.status_code == 422 and resp.json()["field"] == field, (payload, resp.text)
        nan = api.post("/v1/queries", content=json.dumps(body).replace("0.6", "NaN"), headers={"content-type": "application/json"})
        assert nan.status_code == 422
        assert api.get("/v1/queries/nope").status_code == 404


def test_manifest_dataset_and_sampler(tmp_path, ctx, data_root):
    """Real images on disk -> manifest -> ManifestDataset + sampler, and the imagefolder tree."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader

    from nds_client.imagefolder import build_tree
    from nds_client.manifest_dataset import ManifestDataset
    from tests.conftest import write_images

    folder = write_images(data_root / "imgs", labels=("cat", "dog"), n=3)
    plain = {"shard": None, "offset": None, "size": None}  # files of their own, not inside a shard
    rows = [
        {"key": "d/1", "uri": str(folder / "cat" / "0.png"), "label": "cat", "dataset": "d", "cluster": 0, "weight": 0.5, "count": 3, **plain},
        {"key": "d/2", "uri": str(folder / "dog" / "1.png"), "label": "dog", "dataset": "d", "cluster": 1, "weight": 0.25, "count": 1, **plain},
        {"key": "d/3", "uri": str(folder / "dog" / "2.png"), "label": None, "dataset": "d", "cluster": 1, "weight": 0.25, "count": 2, **plain},
    ]
    for fmt in ("csv", "jsonl", "parquet"):
        path = tmp_path / f"m.{fmt}"
        path.write_bytes(b"".join(ctx.exporters.get(fmt)().stream([rows])))
        ds = ManifestDataset(path, transform=torchvision.transforms.ToTensor())
        loader = DataLoader(ds, batch_size=4, sampler=ds.sampler(generator=torch.Generator().manual_seed(0)))
        seen = [t for _, targets in loader for t in targets.tolist()]
        assert sorted(seen) == [-1, -1, 0, 0, 0, 1], fmt  # each row `count` times per epoch
        image, target = ds[0]
        assert image.shape == (3, 32, 32) and target == 0 and ds.classes == ["cat", "dog"]
        assert len(list(ds.sampler(by="weight", num_samples=10))) == 10
    tree = tmp_path / "tree"
    assert build_tree(rows, tree) == 6
    assert sorted(p.name for p in (tree / "cat").iterdir()) == ["d-1.png", "d-1__1.png", "d-1__2.png"]
    folder_ds = torchvision.datasets.ImageFolder(tree)
    assert len(folder_ds) == 6 and set(folder_ds.classes) == {"cat", "dog", "_unlabelled"}
    with pytest.raises(InvalidInputError, match="not empty"):
        build_tree(rows, tree)
