"""The collection sources (webdataset, parquet, coco), registered through the catalog: rows, addresses, labels, metadata, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from sqlmodel import Session, select

from nds.catalog.jobs import InlineDispatcher, get_job
from nds.catalog.registration import RegistrationRequest, start_registration
from nds.catalog.tables import Dataset, DatasetStatus, JobStatus, Sample
from nds.plugins.contract import SkippedPart, SourceItem
from nds.plugins.sources.webdataset import WebDatasetSource, split_key
from nds_client.errors import InvalidInputError
from nds_client.storage import Location, parquet_row_uri, read_location
from tests.collections_data import (
    COCO_CATEGORIES,
    coco_expected,
    corrupt_row_group,
    image_bytes,
    shard_key,
    write_coco,
    write_parquet,
    write_saved,
    write_shards,
)
from tests.s3 import bucket, s3_server  # noqa: F401 - fixtures


def register(ctx, name: str, path: Path | str, source: str, **options: str):
    dataset, job = start_registration(ctx, RegistrationRequest(name=name, path=str(path), source=source, options=options))
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        return session.get(Dataset, dataset.id), get_job(session, job.id)


def samples_of(ctx, dataset_id: int) -> list[Sample]:
    with Session(ctx.engine) as session:
        return list(session.exec(select(Sample).where(Sample.dataset_id == dataset_id).order_by(Sample.position)).all())


def assert_read_back(samples: list[Sample]) -> None:
    """Every sample read from its stored location (one ranged read / one row group) has the stored digest."""
    for s in samples:
        data = read_location(Location(s.uri, s.shard, s.offset, s.byte_size))
        assert hashlib.sha256(data).hexdigest() == s.sha256, s.uri
        assert len(data) == s.byte_size


def assert_refused(ctx, path: Path | str, source: str, *needles: str, field: str = "path", **options: str) -> InvalidInputError:
    with Session(ctx.engine) as session:
        before = (len(session.exec(select(Dataset.id)).all()), len(session.exec(select(Sample.id)).all()))
    with pytest.raises(InvalidInputError) as info:
        start_registration(ctx, RegistrationRequest(name="bad", path=str(path), source=source, options=options))
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert info.value.field == field, (info.value.field, str(info.value))
    with Session(ctx.engine) as session:  # nothing stored
        assert (len(session.exec(select(Dataset.id)).all()), len(session.exec(select(Sample.id)).all())) == before
    return info.value


# --------------------------------------------------------------------------- webdataset


def test_webdataset_folder_labels_offsets_and_meta(ctx, data_root):
    shards = write_shards(data_root / "shards", 3, 10)
    dataset, job = register(ctx, "wds", data_root / "shards", "webdataset")
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.status, dataset.num_samples, dataset.labels, dataset.skipped) == (DatasetStatus.ready, 30, ["0", "1"], 0)
    samples = samples_of(ctx, dataset.id)
    first = samples[0]
    assert first.uri == f"{shards[0]}#{shard_key(0, 0)}.png"
    assert first.shard == str(shards[0]) and first.meta == {"key": shard_key(0, 0)}
    assert (first.width, first.height, first.label) == (32, 32, "0")
    assert [s.shard for s in samples] == [str(p) for p in shards for _ in range(10)]
    with tarfile.open(shards[1]) as tar:  # the offsets are the members' data offsets
        member = tar.getmember(f"{shard_key(1, 3)}.png")
    assert (samples[13].offset, samples[13].byte_size) == (member.offset_data, member.size)
    assert samples[13].sha256 == hashlib.sha256(image_bytes(13)).hexdigest()
    assert_read_back(samples)


@pytest.mark.parametrize(("pattern", "count"), [("shards/*.tar", 32), ("shards/{00000..00002}.tar", 24),
                                                ("shards/{00001,00003}.tar", 16), ("shards/0000[0-1].tar", 16)])
def test_webdataset_glob_and_brace_patterns(ctx, data_root, pattern, count):
    write_shards(data_root / "shards", 4, 8)
    (data_root / "shards" / "notes.txt").write_text("not a shard")  # a glob takes the .tar files only
    dataset, job = register(ctx, "wds", data_root / pattern, "webdataset")
    assert job.status == JobStatus.succeeded, job.error
    assert dataset.num_samples == count


def test_webdataset_json_label_field(ctx, data_root):
    write_shards(data_root / "shards", 2, 6, sidecars="json")
    dataset, job = register(ctx, "by-label", data_root / "shards", "webdataset", label_field="label")
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.labels) == (12, ["cat", "dog"])
    nested, _ = register(ctx, "by-nested", data_root / "shards", "webdataset", label_field="meta.class")
    assert nested.labels == ["cat", "dog"]
    assert [s.label for s in samples_of(ctx, nested.id)][:4] == ["cat", "dog", "cat", "dog"]
    unlabelled, _ = register(ctx, "no-label", data_root / "shards", "webdataset")  # no .cls member, no label_field
    assert (unlabelled.num_samples, unlabelled.num_labels) == (12, 0)
    absent, _ = register(ctx, "absent-field", data_root / "shards", "webdataset", label_field="nope")
    assert absent.num_labels == 0


def test_webdataset_label_field_may_name_a_member_extension(ctx, data_root):
    write_shards(data_root / "shards", 1, 4)  # KEY.png + KEY.cls
    dataset, job = register(ctx, "by-ext", data_root / "shards", "webdataset", label_field="cls")
    assert job.status == JobStatus.succeeded, job.error
    assert dataset.labels == ["0", "1"]


def test_webdataset_label_field_holding_an_object_fails_naming_the_member(ctx, data_root):
    write_shards(data_root / "shards", 1, 3, sidecars="json")
    dataset, job = register(ctx, "objects", data_root / "shards", "webdataset", label_field="meta")
    assert job.status == JobStatus.failed
    assert "00000.tar" in job.error and f"{shard_key(0, 0)}.png" in job.error and "'meta'" in job.error
    with Session(ctx.engine) as session:
        assert session.exec(select(Sample)).all() == []


def test_img2dataset_layout_keeps_url_caption_and_key(ctx, data_root):
    write_shards(data_root / "laion", 2, 5, sidecars="img2dataset")
    dataset, job = register(ctx, "laion", data_root / "laion", "webdataset")  # the .parquet and _stats.json beside are not shards
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.num_labels, dataset.skipped) == (10, 0, 0)
    samples = samples_of(ctx, dataset.id)
    key = shard_key(1, 2)
    s = samples[7]
    assert s.uri.endswith(f"00001.tar#{key}.jpg")
    assert s.meta == {"key": key, "url": f"https://example.com/{key}.jpg", "caption": "a picture of dog number 7"}
    assert_read_back(samples)


def test_img2dataset_parquet_beside_the_shard_gives_the_url_without_json_members(ctx, data_root):
    write_shards(data_root / "laion", 1, 4, sidecars="img2dataset", member_json=False)
    dataset, job = register(ctx, "laion", data_root / "laion", "webdataset")
    assert job.status == JobStatus.succeeded, job.error
    s = samples_of(ctx, dataset.id)[3]
    key = shard_key(0, 3)
    assert s.meta == {"key": key, "url": f"https://example.com/{key}.jpg", "caption": "a picture of dog number 3"}


def test_truncated_shard_is_skipped_and_listed_good_shards_register(ctx, data_root):
    shards = write_shards(data_root / "shards", 4, 10, truncate_last=True)
    dataset, job = register(ctx, "wds", data_root / "shards" / "{00000..00003}.tar", "webdataset")
    assert job.status == JobStatus.succeeded, job.error
    assert dataset.num_samples == 30
    assert {s.shard for s in samples_of(ctx, dataset.id)} == {str(p) for p in shards[:3]}
    [skipped] = job.result["skipped_parts"]
    assert skipped["part"] == str(shards[3]) and "00003.tar" in skipped["reason"]


def _source(ctx, location: Path | str, **options: str) -> WebDatasetSource:
    return WebDatasetSource(str(location), ctx.source_storage, **options)


def test_shards_cut_at_a_member_boundary_or_with_a_corrupt_header_are_skipped(ctx, data_root):
    [shard] = write_shards(data_root / "a", 1, 6)
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    boundary = members[6].offset  # the header of the 4th sample's image: a cut exactly there leaves 3 whole samples
    cut = data_root / "cut.tar"
    cut.write_bytes(data[:boundary])
    corrupt = data_root / "corrupt.tar"
    corrupt.write_bytes(data[:boundary] + b"\x07" * 512 + data[boundary + 512 :])
    for path, needle in ((cut, "truncated"), (corrupt, "corrupt member header")):
        got = list(_source(ctx, path).items())
        assert [type(x) for x in got] == [SourceItem] * 2 + [SkippedPart], path  # (the 3rd waits for the end, which is bad)
        assert got[-1].part == str(path) and needle in got[-1].reason and f"{boundary:,}" in got[-1].reason
    whole = list(_source(ctx, shard).items())
    assert len(whole) == 6 and all(isinstance(x, SourceItem) for x in whole)
    empty = data_root / "empty.tar"
    empty.write_bytes(b"")
    [part] = list(_source(ctx, empty).items())
    assert isinstance(part, SkippedPart) and "empty.tar" in part.reason


def test_webdataset_patterns_matching_nothing_or_naming_a_missing_shard(ctx, data_root):
    write_shards(data_root / "shards", 2, 2)
    assert_refused(ctx, data_root / "shards" / "*.tgz", "webdataset", "matches no .tar shards")
    assert_refused(ctx, data_root / "shards" / "{00000..00004}.tar", "webdataset", "00002.tar does not exist")
    (data_root / "empty").mkdir()
    assert_refused(ctx, data_root / "empty", "webdataset", "holds no .tar shards")
    assert_refused(ctx, data_root / "shards", "webdataset", "takes no option", field="options", label_column="x")


def test_non_image_members_are_skipped_and_counted(ctx, data_root):
    path = data_root / "mixed" / "00000.tar"
    path.parent.mkdir()

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tar:
        add(tar, "__index__", b"ignored")
        add(tar, "a.png", image_bytes(0))
        add(tar, "a.cls", b"x")
        add(tar, "b.png", b"not a png at all")  # an image suffix, not an image
        add(tar, "b.cls", b"y")
        add(tar, "c.npy", b"\x93NUMPY not an image")  # no image member: yielded, so counted
        add(tar, "sub/d.seg.png", image_bytes(1))  # key sub/d, extension seg.png
        add(tar, "sub/d.cls", b"z")
    dataset, job = register(ctx, "mixed", path.parent, "webdataset")
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.skipped, dataset.labels) == (2, 2, ["x", "z"])
    assert job.result["skipped_reasons"] == {"not an image": 2}
    assert {f["uri"] for f in job.result["skipped_files"]} == {f"{path}#b.png", f"{path}#c.npy"}
    assert samples_of(ctx, dataset.id)[1].meta == {"key": "sub/d"}
    assert split_key("sub/d.seg.png") == ("sub/d", "seg.png") and split_key("README") == ("README", "")


def test_cli_registers_shards_with_label_field(nds, data_root):
    write_shards(data_root / "shards", 2, 3, sidecars="json")
    assert nds("db", "upgrade").exit_code == 0
    result = nds("datasets", "add", "wds", str(data_root / "shards" / "{00000..00001}.tar"), "--source", "webdataset",
                 "--label-field", "label")
    assert result.exit_code == 0, result.output
    listed = json.loads(nds("datasets", "list", "--json").output)
    rows = listed.get("data", listed) if isinstance(listed, dict) else listed
    assert [(d["name"], d["num_samples"], d["num_labels"]) for d in rows] == [("wds", 6, 2)]


# --------------------------------------------------------------------------- parquet


def test_parquet_hf_layout_classlabel_names_row_uris(ctx, data_root):
    path = write_parquet(data_root / "hf" / "train.parquet", 12, row_group_size=5)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(path).num_row_groups == 3
    dataset, job = register(ctx, "hf", path, "parquet")
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.labels, dataset.skipped) == (12, ["cat", "dog"], 0)
    samples = samples_of(ctx, dataset.id)
    assert [s.offset for s in samples] == list(range(12))
    s = samples[7]
    assert (s.uri, s.shard, s.label, s.meta) == (parquet_row_uri(str(path), 7, "image"), str(path), "dog", None)
    assert s.sha256 == hashlib.sha256(image_bytes(7)).hexdigest()
    assert_read_back(samples)
    folder, _ = register(ctx, "hf-folder", data_root / "hf", "parquet")  # a folder of Parquet files
    assert folder.num_samples == 12


def test_parquet_string_labels_and_meta(ctx, data_root):
    path = write_parquet(data_root / "p" / "rows.parquet", 6, layout="strings")
    dataset, job = register(ctx, "strings", data_root / "p" / "*.parquet", "parquet")
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.labels) == (6, ["cat", "dog"])
    s = samples_of(ctx, dataset.id)[3]
    assert s.uri == parquet_row_uri(str(path), 3, "jpg")  # found as the first bytes column
    assert s.meta == {"url": "https://example.com/3.png", "caption": "a picture of dog", "key": "k00003"}
    relabelled, _ = register(ctx, "by-caption", path, "parquet", label_column="caption")
    assert relabelled.labels == ["a picture of cat", "a picture of dog"]


def test_parquet_path_column_gives_plain_file_samples(ctx, data_root):
    path = write_parquet(data_root / "meta" / "index.parquet", 5, layout="path")
    dataset, job = register(ctx, "paths", path, "parquet")
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.labels) == (5, ["cat", "dog"])
    samples = samples_of(ctx, dataset.id)
    assert samples[2].uri == str(data_root / "meta" / "files" / "2.png") and samples[2].shard is None
    assert_read_back(samples)
    named, _ = register(ctx, "named", path, "parquet", path_column="file_name")
    assert named.num_samples == 5


def test_parquet_save_to_disk_folder(ctx, data_root):
    folder = write_saved(data_root / "saved", 7)
    dataset, job = register(ctx, "saved", folder, "parquet")
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.labels) == (7, ["cat", "dog"])
    samples = samples_of(ctx, dataset.id)
    assert samples[0].shard.endswith(".arrow") and samples[0].uri == parquet_row_uri(samples[0].shard, 0, "image")
    assert samples[5].label == "dog"
    assert_read_back(samples)


def test_parquet_save_to_disk_dataset_dict_split(ctx, data_root):
    import datasets

    write_saved(data_root / "tmp-train", 4)
    write_saved(data_root / "tmp-test", 3)
    dd = datasets.DatasetDict({"train": datasets.load_from_disk(str(data_root / "tmp-train")),
                               "test": datasets.load_from_disk(str(data_root / "tmp-test"))})
    dd.save_to_disk(str(data_root / "dd"))
    train, job = register(ctx, "dd-train", data_root / "dd", "parquet")
    assert job.status == JobStatus.succeeded, job.error
    assert train.num_samples == 4
    test, _ = register(ctx, "dd-test", data_root / "dd", "parquet", split="test")
    assert test.num_samples == 3
    assert_refused(ctx, data_root / "dd", "parquet", "no split 'dev'", "splits: ", field="split", split="dev")


def test_parquet_without_an_image_column_names_the_file_and_columns(ctx, data_root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = data_root / "nothing.parquet"
    pq.write_table(pa.table({"label": ["a", "b"], "score": [0.1, 0.2]}), path)
    assert_refused(ctx, path, "parquet", "nothing.parquet: no image column (columns: label, score)", field="image_column")
    urls = data_root / "urls.parquet"
    pq.write_table(pa.table({"url": ["https://example.com/a.jpg"], "caption": ["a"]}), urls)
    assert_refused(ctx, urls, "parquet", "urls.parquet", "web urls", field="image_column")
    good = write_parquet(data_root / "good.parquet", 2)
    assert_refused(ctx, good, "parquet", "no column 'picture'", "columns: image, label", field="image_column", image_column="picture")
    (data_root / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    assert_refused(ctx, data_root / "junk.parquet", "parquet", "junk.parquet: not a readable Parquet file")


def test_parquet_unreadable_row_group_skips_the_file_and_names_the_group(ctx, data_root):
    good = write_parquet(data_root / "pq" / "a.parquet", 6, layout="strings", row_group_size=3)
    bad = write_parquet(data_root / "pq" / "b.parquet", 9, layout="strings", row_group_size=3)
    corrupt_row_group(bad, 1)
    dataset, job = register(ctx, "pq", data_root / "pq", "parquet")
    assert job.status == JobStatus.succeeded, job.error
    assert dataset.num_samples == 6
    assert {s.shard for s in samples_of(ctx, dataset.id)} == {str(good)}
    [skipped] = job.result["skipped_parts"]
    assert skipped["part"] == str(bad) and "b.parquet: row group 1 of 3 (rows from 3)" in skipped["reason"]
    alone, job = register(ctx, "alone", bad, "parquet")  # nothing readable: the registration fails, saying why
    assert job.status == JobStatus.failed and "row group 1 of 3" in job.error


# --------------------------------------------------------------------------- coco


def test_coco_label_is_the_largest_annotation_and_categories_are_kept(ctx, data_root):
    path = write_coco(data_root / "coco", 7)
    dataset, job = register(ctx, "coco", path, "coco")  # images: coco/val, beside annotations/
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.labels) == (7, sorted(name for _, name in COCO_CATEGORIES))
    samples = samples_of(ctx, dataset.id)
    assert [(s.label, s.meta["categories"]) for s in samples] == coco_expected(7)
    assert [s.meta["coco_id"] for s in samples] == list(range(100, 107))
    assert samples[0].uri == str(data_root / "coco" / "val" / "000000.png") and samples[0].shard is None
    assert_read_back(samples)


def test_coco_images_option_and_missing_images_counted(ctx, data_root):
    path = write_coco(data_root / "coco", 8, missing=3)
    (data_root / "coco" / "val").rename(data_root / "coco" / "pictures")
    assert_refused(ctx, path, "coco", "no image folder found", field="images")
    dataset, job = register(ctx, "coco", path, "coco", images="../pictures")
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.skipped) == (5, 3)
    assert job.result["skipped_reasons"] == {"missing or unresolvable": 3}
    assert {Path(f["uri"]).name for f in job.result["skipped_files"]} == {"000004.png", "000005.png", "000006.png"}


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda text: text[:-20], "invalid JSON at line 1 column"),
        (lambda text: "[]", "$: expected a JSON object"),
        (lambda doc: doc.pop("images"), "images: missing"),
        (lambda doc: doc["images"][3].pop("file_name"), "images[3].file_name: missing"),
        (lambda doc: doc["images"][2].update(id=101), "images[2].id: 101 is already the id of images[1]"),
        (lambda doc: doc["images"][1].update(file_name="000000.png"), "images[1].file_name: 000000.png is already listed at images[0]"),
        (lambda doc: doc["annotations"][4].update(category_id=99), "annotations[4].category_id: no category has the id 99"),
        (lambda doc: doc["annotations"][1].update(image_id=5), "annotations[1].image_id: no image has the id 5"),
        (lambda doc: doc["annotations"][0].update(area="big"), "annotations[0].area: expected a number"),
        (lambda doc: doc["annotations"][1].update(bbox=[1, 2]), "annotations[1].bbox: expected [x, y, width, height]"),
        (lambda doc: doc["categories"][2].pop("name"), "categories[2].name: missing"),
    ],
    ids=["syntax", "not-an-object", "no-images", "no-file-name", "duplicate-id", "duplicate-file", "unknown-category",
         "unknown-image", "bad-area", "bad-bbox", "no-category-name"],
)
def test_malformed_coco_json_names_the_json_path(ctx, data_root, edit, needle):
    path = write_coco(data_root / "coco", 5)
    text = path.read_text()
    if edit.__code__.co_varnames[0] == "text":
        path.write_text(edit(text))
    else:
        doc = json.loads(text)
        edit(doc)
        path.write_text(json.dumps(doc))
    error = assert_refused(ctx, path, "coco", f"instances_val.json: {needle}" if not needle.startswith("invalid") else needle)
    assert "instances_val.json" in str(error)


# --------------------------------------------------------------------------- object storage


@pytest.fixture
def s3ctx(tmp_path, data_root, bucket):  # noqa: F811 - the fixture
    """A catalog whose data roots are a local folder and ``s3://BUCKET/data``; (ctx, bucket, prefix)."""
    from nds.catalog.context import CatalogContext
    from nds.catalog.db import upgrade
    from nds.catalog.settings import load_settings

    prefix = bucket.uri("data")
    settings = load_settings(home=tmp_path / "home", data_roots=[data_root, prefix], database_url=None, qdrant_url=None, broker_url=None)
    upgrade(settings)
    ctx = CatalogContext.open(settings)
    yield ctx, prefix
    ctx.close()


def test_coco_img2dataset_and_save_to_disk_in_object_storage(s3ctx, bucket, tmp_path):  # noqa: F811 - the fixture
    ctx, prefix = s3ctx
    upload = tmp_path / "upload"
    write_coco(upload / "coco", 5, missing=1)
    write_shards(upload / "laion", 2, 3, sidecars="img2dataset")
    write_saved(upload / "saved", 4)
    bucket.upload_folder(upload, "data")
    coco, job = register(ctx, "coco", f"{prefix}/coco/annotations/instances_val.json", "coco")
    assert job.status == JobStatus.succeeded, job.error
    assert (coco.num_samples, coco.skipped) == (4, 1)
    assert job.result["skipped_reasons"] == {"missing or unresolvable": 1}  # as in a local folder
    samples = samples_of(ctx, coco.id)
    assert samples[0].uri == f"{prefix}/coco/val/000000.png"
    assert [(s.label, s.meta["categories"]) for s in samples] == [e for i, e in enumerate(coco_expected(5)) if i != 3]
    laion, job = register(ctx, "laion", f"{prefix}/laion", "webdataset")
    assert job.status == JobStatus.succeeded, job.error
    assert laion.num_samples == 6
    s = samples_of(ctx, laion.id)[4]
    assert s.shard == f"{prefix}/laion/00001.tar" and s.meta["url"] == f"https://example.com/{shard_key(1, 1)}.jpg"
    saved, job = register(ctx, "saved", f"{prefix}/saved", "parquet")
    assert job.status == JobStatus.succeeded, job.error
    assert (saved.num_samples, saved.labels) == (4, ["cat", "dog"])
    for dataset in (coco, laion, saved):
        assert_read_back(samples_of(ctx, dataset.id))
