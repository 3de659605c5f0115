"""``bulk_insert``: COPY on PostgreSQL, executemany on SQLite, and the same rows as ``insert()`` on both.

Each test runs on SQLite and (``-m server``) on the test PostgreSQL: hostile text (tabs,
newlines, backslashes, quotes, unicode), NULLs, JSON (``None`` included), bytes, the three
shapes of input, Python-side defaults, ids never reused, NUL in text (refused by
PostgreSQL as by ``insert()``, kept by SQLite), and a failure rolling back everything.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import delete, func, insert, text
from sqlalchemy.exc import DataError, IntegrityError
from sqlmodel import Session, select

from nds.catalog.bulk import bulk_insert
from nds.catalog.context import CatalogContext
from nds.catalog.db import create_db_engine, session_scope, unavailable_database, upgrade
from nds.catalog.jobs import InlineDispatcher, get_job
from nds.catalog.registration import RegistrationRequest, start_registration, store_items
from nds.catalog.settings import load_settings
from nds.catalog.tables import Assignment, Cluster, Dataset, DatasetStatus, Group, JobStatus, Sample
from nds.plugins.contract import SourceItem
from nds_client.errors import ServiceUnavailableError
from tests.conftest import write_images
from tests.server_mode import reset_database

HOSTILE = ["tab\there", "new\nline\r\n", "back\\slash \\N \\.", "quotes ' \" `", "ünïcødé 猫 😀", "", " lead and trail ", "a,b;c|d",
           "\\x00 (the text, not the byte)", "\u2028\u2029\x7f\x1b"]


@pytest.fixture
def backend(any_settings):
    """(settings, engine) of an empty, migrated catalog on SQLite and on the test PostgreSQL."""
    engine = create_db_engine(any_settings)
    yield any_settings, engine
    engine.dispose()


def new_dataset(engine, name: str = "d") -> int:
    with session_scope(engine) as session:
        dataset = Dataset(name=name, source="manifest", uri="/nowhere")
        session.add(dataset)
        session.flush()
        return int(dataset.id)


def sample_rows(dataset_id: int, first: int = 0) -> list[dict]:
    rows = []
    for i, s in enumerate(HOSTILE):
        rows.append({"dataset_id": dataset_id, "uri": f"/data/{s}/{i}.png", "label": s if i % 3 else None, "width": i, "height": 2 * i,
                     "byte_size": 10**9 + i, "sha256": f"{i:064x}", "shard": None if i % 2 else f"s3://b/{s}.tar",
                     "offset": None if i % 2 else 2**40 + i, "position": first + i,
                     "meta": [None, {"caption": s, "n": [1, 2.5, None, True], "nested": {s: s}}, {}, {"u": "😀\t\\"}][i % 4]})
    return rows


def read_samples(engine, dataset_id: int) -> list[tuple]:
    with Session(engine) as session:
        got = session.exec(select(Sample).where(Sample.dataset_id == dataset_id).order_by(Sample.position)).all()
        return [(s.uri, s.label, s.width, s.height, s.byte_size, s.sha256, s.shard, s.offset, s.position, s.meta) for s in got]


def test_rows_are_those_insert_writes(backend):
    """Hostile text, NULLs, JSON (None too), big integers: read back exactly as insert() stores them."""
    _, engine = backend
    old, new = new_dataset(engine, "old"), new_dataset(engine, "new")
    with session_scope(engine) as session:
        session.execute(insert(Sample), sample_rows(old))
    with session_scope(engine) as session:
        assert bulk_insert(session, Sample, sample_rows(new)) == len(HOSTILE)
    assert read_samples(engine, new) == read_samples(engine, old)
    got = read_samples(engine, new)
    assert [r[0] for r in got] == [f"/data/{s}/{i}.png" for i, s in enumerate(HOSTILE)]
    assert got[1][9] == {"caption": HOSTILE[1], "n": [1, 2.5, None, True], "nested": {HOSTILE[1]: HOSTILE[1]}}
    assert got[0][1] is None and got[1][6] is None and got[1][7] is None and got[0][7] == 2**40
    with engine.connect() as conn:  # a JSON column stores what insert() stores for None (JSON null), on both paths
        stored = conn.execute(text("SELECT dataset_id, position, meta IS NULL FROM samples ORDER BY dataset_id, position")).all()
    assert [r[2] for r in stored if r[0] == new] == [r[2] for r in stored if r[0] == old]


def test_bytes_defaults_and_column_shapes(backend):
    """bytes to a bytea/BLOB column; a Python-side default (created_at) filled in; columns
    given as numpy arrays, rows as tuples, or as mappings."""
    _, engine = backend
    d = new_dataset(engine)
    centroid = np.array([0.0, -1.5, 3.25, np.nan], np.float32).tobytes() + b"\x00\\\t\n\xff"
    with session_scope(engine) as session:
        bulk_insert(session, Cluster, [{"dataset_id": d, "index_version": 1, "cluster": 0, "size": 2, "label": "a\tb", "centroid": centroid},
                                       {"dataset_id": d, "index_version": 1, "cluster": 1, "size": 0, "label": None, "centroid": None}])
        bulk_insert(session, Assignment, {"sample_id": np.arange(5, dtype=np.int64) + 2**33, "index_version": np.ones(5, np.int32),
                                          "dataset_id": [d] * 5, "cluster": np.array([0, 0, 1, 1, 1]), "label": ["x", None, "y\\", "y\\", "\n"],
                                          "rank": np.array([0, 1, 0, 1, 2])})
        bulk_insert(session, Group, [(d, 1, 0, "x", 1), (d, 1, 1, None, 3)], columns=["dataset_id", "index_version", "cluster", "label", "size"])
    with Session(engine) as session:
        clusters = session.exec(select(Cluster).order_by(Cluster.cluster)).all()
        assignments = session.exec(select(Assignment).order_by(Assignment.sample_id)).all()
        groups = session.exec(select(Group).order_by(Group.cluster)).all()
    assert bytes(clusters[0].centroid) == centroid and clusters[1].centroid is None
    assert (clusters[0].label, clusters[1].label) == ("a\tb", None)
    assert all(c.created_at is not None for c in clusters)
    assert [(a.sample_id, a.cluster, a.label, a.rank) for a in assignments] == [
        (2**33, 0, "x", 0), (2**33 + 1, 0, None, 1), (2**33 + 2, 1, "y\\", 0), (2**33 + 3, 1, "y\\", 1), (2**33 + 4, 1, "\n", 2)]
    assert [(g.cluster, g.label, g.size) for g in groups] == [(0, "x", 1), (1, None, 3)]
    assert groups[0].id is not None and groups[1].id > groups[0].id


def test_nothing_to_insert_is_no_statement(backend):
    _, engine = backend
    with session_scope(engine) as session:
        assert bulk_insert(session, Group, []) == 0
        assert bulk_insert(session, Group, {"dataset_id": [], "index_version": [], "cluster": [], "label": [], "size": []}) == 0
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(Group)).one() == 0


def test_bad_calls_are_refused(backend):
    _, engine = backend
    d = new_dataset(engine)
    with session_scope(engine) as session:
        with pytest.raises(ValueError, match="never reused"):
            bulk_insert(session, Sample, [{**sample_rows(d)[0], "id": 7}])
        with pytest.raises(ValueError, match="no column"):
            bulk_insert(session, Group, [{"dataset_id": d, "index_version": 1, "cluster": 0, "size": 1, "colour": "red"}])
        with pytest.raises(ValueError, match="column names"):
            bulk_insert(session, Group, [(d, 1, 0, None, 1)])
        with pytest.raises(ValueError, match="different lengths"):
            bulk_insert(session, Group, {"dataset_id": [d, d], "index_version": [1], "cluster": [0], "size": [1]})


def test_ids_are_never_reused(backend):
    """ids come from the sequence (PostgreSQL) or AUTOINCREMENT (SQLite): deleting the newest
    samples does not hand their ids out again, and a rolled-back COPY's are not reused either."""
    _, engine = backend
    d = new_dataset(engine)
    with session_scope(engine) as session:
        bulk_insert(session, Sample, sample_rows(d))
    with Session(engine) as session:
        first = session.exec(select(func.max(Sample.id))).one()
    with session_scope(engine) as session:
        session.execute(delete(Sample))
    with session_scope(engine) as session:
        bulk_insert(session, Sample, sample_rows(d))
    with Session(engine) as session:
        ids = session.exec(select(Sample.id).order_by(Sample.id)).all()
    assert min(ids) > first and len(set(ids)) == len(HOSTILE)


def test_a_failure_rolls_back_everything(backend):
    """A failing row (a duplicate position) fails the call and the transaction: the dataset
    added beside it, the rows written before it in the same transaction, none of them stay."""
    _, engine = backend
    d = new_dataset(engine)
    rows = sample_rows(d)
    with pytest.raises(IntegrityError), session_scope(engine) as session:
        session.add(Dataset(name="beside", source="manifest", uri="/x"))
        bulk_insert(session, Sample, rows[:3])
        bulk_insert(session, Sample, rows[3:] + [{**rows[-1], "uri": "dup"}])
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        bulk_insert(session, Sample, rows)
        raise RuntimeError("a later step fails")
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(Sample)).one() == 0
        assert session.exec(select(Dataset.name)).all() == ["d"]
    with session_scope(engine) as session:  # and the connection is usable afterwards
        assert bulk_insert(session, Sample, rows) == len(rows)


def test_nul_in_text_as_insert_does(backend):
    """PostgreSQL text cannot hold NUL: refused, as insert() refuses it (the same DataError,
    nothing stored); SQLite stores it, as before."""
    settings, engine = backend
    d = new_dataset(engine)
    row = {**sample_rows(d)[1], "label": "a\x00b"}
    if settings.sqlalchemy_url.startswith("sqlite"):
        with session_scope(engine) as session:
            bulk_insert(session, Sample, [row])
        assert read_samples(engine, d)[0][1] == "a\x00b"
        return
    for write in (lambda s: s.execute(insert(Sample), [row]), lambda s: bulk_insert(s, Sample, [sample_rows(d, 100)[0], row])):
        with pytest.raises(DataError, match="NUL"), session_scope(engine) as session:
            write(session)
    assert read_samples(engine, d) == []


def test_registration_with_a_nul_label_as_before(backend, data_root):
    """A manifest whose label holds NUL: on PostgreSQL the registration fails and nothing
    stays (as with the executemany before); on SQLite it registers."""
    settings, _ = backend
    write_images(data_root / "imgs", labels=("a",), n=2)
    manifest = data_root / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"uri": f"imgs/a/{i}.png", "label": f"x\u0000{i}"}) for i in range(2)) + "\n")
    ctx = CatalogContext.open(settings)
    try:
        dataset, job = start_registration(ctx, RegistrationRequest(name="nul", path=str(manifest), source="manifest"))
        InlineDispatcher(ctx).submit(job)
        with Session(ctx.engine) as session:
            job, left = get_job(session, job.id), session.get(Dataset, dataset.id)
            samples = session.exec(select(Sample.label).order_by(Sample.position)).all()
        if settings.sqlalchemy_url.startswith("sqlite"):
            assert job.status == JobStatus.succeeded and left.status == DatasetStatus.ready and samples == ["x\x000", "x\x001"]
        else:
            assert job.status == JobStatus.failed and "NUL" in job.error, job.error
            assert left is None and samples == []
    finally:
        ctx.close()


def test_store_items_keeps_ids_in_position_order(backend, data_root):
    settings, engine = backend
    folder = write_images(data_root / "imgs", labels=("p", "q"), n=3)
    d = new_dataset(engine)
    ctx = CatalogContext.open(settings)
    try:
        items = iter([SourceItem(str(p), p.parent.name, p.name) for p in sorted(folder.rglob("*.png"))])
        scan = store_items(ctx, d, items, first_position=1 << 32, total_parts=6, keep_ids=True)
    finally:
        ctx.close()
    with Session(engine) as session:
        expected = session.exec(select(Sample.id).where(Sample.dataset_id == d).order_by(Sample.position)).all()
        positions = session.exec(select(Sample.position).where(Sample.dataset_id == d).order_by(Sample.position)).all()
    assert scan.stored == 6 and scan.sample_ids == expected and positions == [(1 << 32) + i for i in range(6)]


@pytest.mark.server
def test_a_dropped_connection_is_the_catalog_unreachable(services, tmp_path, data_root):
    """The server ends the session mid-transaction: the COPY fails as SQLAlchemy's
    OperationalError (so the catalog says 'retry in a moment'), the connection is invalidated."""
    reset_database(services.migrations_database_url)
    settings = load_settings(home=tmp_path / "home", data_roots=[data_root], database_url=services.migrations_database_url,
                             qdrant_url=None, broker_url=None)
    upgrade(settings)
    engine = create_db_engine(settings)
    try:
        d = new_dataset(engine)
        with pytest.raises(Exception) as caught, session_scope(engine) as session:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
            with engine.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            bulk_insert(session, Sample, sample_rows(d))
        assert isinstance(unavailable_database(caught.value), ServiceUnavailableError), repr(caught.value)
        with session_scope(engine) as session:  # the pool hands out a live connection next
            assert bulk_insert(session, Sample, sample_rows(d)) == len(HOSTILE)
    finally:
        engine.dispose()


def test_an_insert_statement_as_the_target(backend):
    """``insert(Table)`` or ``insert(Model)`` as the target: the same rows as with the table."""
    _, engine = backend
    d = new_dataset(engine)
    with session_scope(engine) as session:
        bulk_insert(session, insert(Sample), sample_rows(d))
        bulk_insert(session, insert(Group.__table__), [{"dataset_id": d, "index_version": 1, "cluster": 0, "label": None, "size": 1}])
    assert len(read_samples(engine, d)) == len(HOSTILE)
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(Group)).one() == 1
