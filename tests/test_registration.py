"""Registering sources through the catalog functions: the scan, skips, and bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlmodel import Session, select

from nds.catalog.jobs import InlineDispatcher, get_job
from nds.catalog.registration import RegistrationRequest, start_registration
from nds.catalog.tables import Dataset, DatasetStatus, JobStatus, Sample
from nds_client.errors import ConflictError, InvalidInputError, SourceError
from tests.conftest import write_images


def register(ctx, name: str, path: Path | str, source: str = "imagefolder"):
    dataset, job = start_registration(ctx, RegistrationRequest(name=name, path=str(path), source=source))
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        return session.get(Dataset, dataset.id), get_job(session, job.id)


def test_imagefolder_rows_and_counts(ctx, data_root):
    folder = write_images(data_root / "src", labels=("cat", "dog", "eel"), n=5)
    (folder / "cat" / "broken.png").write_bytes(b"not an image")
    (folder / "dog" / "empty.png").write_bytes(b"")
    dataset, job = register(ctx, "pets", folder)
    assert job.status == JobStatus.succeeded, job.error
    assert dataset.status == DatasetStatus.ready
    assert (dataset.num_samples, dataset.num_labels, dataset.skipped) == (15, 3, 2)
    assert dataset.labels == ["cat", "dog", "eel"]
    assert job.result["skipped_reasons"] == {"not an image": 1, "empty file": 1}
    assert {s["reason"] for s in job.result["skipped_files"]} == {"not an image", "empty file"}
    with Session(ctx.engine) as session:
        samples = session.exec(select(Sample).where(Sample.dataset_id == dataset.id).order_by(Sample.position)).all()
    positions = [s.position for s in samples]
    assert len(positions) == 15 and positions == sorted(set(positions))  # order keys: the scan order, chunk by chunk
    first = samples[0]
    assert (first.width, first.height, first.label) == (32, 32, "cat")
    assert first.byte_size == Path(first.uri).stat().st_size
    assert len(first.sha256) == 64 and Path(first.uri).is_absolute()


def test_manifest_csv_and_jsonl(ctx, data_root):
    folder = write_images(data_root / "imgs", n=3)
    csv_path = data_root / "m.csv"
    csv_path.write_text("uri,label\nimgs/a/0.png,x\nimgs/a/1.png,y\n" + f"{folder / 'b' / '0.png'},\n")
    dataset, job = register(ctx, "from-csv", csv_path, source="manifest")
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.labels) == (3, ["x", "y"])
    jsonl = data_root / "m.jsonl"
    jsonl.write_text('{"uri": "imgs/a/0.png", "label": "x"}\n\n{"uri": "imgs/b/2.png"}\n')
    dataset, job = register(ctx, "from-jsonl", jsonl, source="manifest")
    assert (dataset.num_samples, dataset.num_labels) == (2, 1)


@pytest.mark.parametrize(
    ("content", "suffix", "field", "needle"),
    [
        ("path,label\nx.png,a\n", ".csv", "uri", "line 1: no 'uri' column"),
        ("uri,label\nimgs/a/0.png,a,extra\n", ".csv", "path", "line 2"),
        ("uri,label\n,a\n", ".csv", "uri", "line 2: empty or missing 'uri'"),
        ('{"uri": "imgs/a/0.png"}\n{not json}\n', ".jsonl", "path", "line 2: invalid JSON"),
        ('{"uri": "http://example.com/x.png"}\n', ".jsonl", "uri", "web urls cannot be registered"),
        ("uri\n", ".txt", "path", "unknown manifest format"),
    ],
)
def test_bad_manifests_name_the_line(ctx, data_root, content, suffix, field, needle):
    write_images(data_root / "imgs", n=1)
    path = data_root / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(InvalidInputError) as info:
        start_registration(ctx, RegistrationRequest(name="bad", path=str(path), source="manifest"))
    assert info.value.field == field and needle in str(info.value)
    assert_no_datasets(ctx)


def test_bad_paths(ctx, data_root, tmp_path):
    outside = write_images(tmp_path / "outside", n=1)
    cases = [
        (str(data_root / "missing"), "does not exist"),
        (str(outside), "outside the data roots"),
        (str(data_root / ".." / "outside"), "outside the data roots"),
    ]
    link = data_root / "escape"
    link.symlink_to(outside)
    cases.append((str(link), "outside the data roots"))
    empty = data_root / "empty"
    empty.mkdir()
    cases.append((str(empty), "holds no files"))
    for path, needle in cases:
        with pytest.raises(InvalidInputError) as info:
            start_registration(ctx, RegistrationRequest(name="x", path=path))
        assert info.value.field == "path" and needle in str(info.value), (path, str(info.value))
    assert_no_datasets(ctx)


def test_unreadable_path(ctx, data_root):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    folder = write_images(data_root / "locked", n=1)
    folder.chmod(0)
    try:
        with pytest.raises(InvalidInputError, match="not readable"):
            start_registration(ctx, RegistrationRequest(name="x", path=str(folder)))
    finally:
        folder.chmod(0o755)


def test_symlinked_file_escaping_roots_is_skipped(ctx, data_root, tmp_path):
    folder = write_images(data_root / "src", n=2)
    secret = write_images(tmp_path / "secret", n=1) / "a" / "0.png"
    (folder / "a" / "sneaky.png").symlink_to(secret)
    dataset, job = register(ctx, "src", folder)
    assert dataset.num_samples == 4
    assert job.result["skipped_reasons"] == {"outside the data roots": 1}


def test_non_utf8_file_name_is_skipped(ctx, data_root):
    folder = write_images(data_root / "src", n=2)
    raw = os.fsencode(folder / "a") + b"/bad-\xff.png"
    with open(raw, "wb") as fh:
        fh.write((folder / "a" / "0.png").read_bytes())
    dataset, job = register(ctx, "src", folder)
    assert dataset.num_samples == 4
    assert job.result["skipped_reasons"] == {"file name is not UTF-8": 1}


def test_duplicate_name_and_bad_name_and_unknown_source(ctx, data_root):
    folder = write_images(data_root / "src", n=1)
    register(ctx, "one", folder)
    with pytest.raises(ConflictError):
        start_registration(ctx, RegistrationRequest(name="one", path=str(folder)))
    with pytest.raises(InvalidInputError) as info:
        start_registration(ctx, RegistrationRequest(name="../evil", path=str(folder)))
    assert info.value.field == "name"
    with pytest.raises(InvalidInputError) as info:
        start_registration(ctx, RegistrationRequest(name="two", path=str(folder), source="nope"))
    assert info.value.field == "source" and "imagefolder" in str(info.value) and "manifest" in str(info.value)
    with Session(ctx.engine) as session:
        assert [d.name for d in session.exec(select(Dataset)).all()] == ["one"]


def test_all_images_corrupt_fails_and_leaves_nothing(ctx, data_root):
    folder = data_root / "junk" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"garbage")
    dataset, job = register(ctx, "junk", folder.parent)
    assert dataset is None
    assert job.status == JobStatus.failed and "no readable images" in job.error and "3 not an image" in job.error
    assert_no_datasets(ctx)


def test_failure_half_way_leaves_no_partial_dataset(ctx, data_root, monkeypatch):
    folder = write_images(data_root / "src", n=3)
    import nds.catalog.registration as registration

    def explode(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(registration, "bulk_insert", explode)  # fail inside the storing transaction
    dataset, job = register(ctx, "src", folder)
    assert dataset is None and job.status == JobStatus.failed and "disk on fire" in job.error
    assert_no_datasets(ctx)


def assert_no_datasets(ctx) -> None:
    with Session(ctx.engine) as session:
        assert session.exec(select(Dataset)).all() == []
        assert session.exec(select(Sample)).all() == []


def test_unknown_source_error_is_source_error_subclass():
    assert issubclass(SourceError, InvalidInputError)
