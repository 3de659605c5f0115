"""Exports of shard and Parquet selections, loaded by the real libraries that train on them.

One module-scoped server (``nds serve``, embedded catalog) with three collections registered
and indexed by the ``nds`` CLI: WebDataset shards (``KEY.png`` + ``KEY.cls``), a Hugging Face
Parquet file (``image`` {bytes, path} structs, a ClassLabel, row groups of 8) and
img2dataset's layout (``KEY.jpg`` + ``KEY.json`` with url, caption, key). Queries over them
are exported in every format and read back with webdataset's ``WebDataset``, ``datasets``'
``load_dataset("parquet")``, torchvision's ``ImageFolder``, ``ManifestDataset`` in a
``DataLoader`` with two workers, and FiftyOne's ``ImageClassificationDirectoryTree``
importer (in a virtual environment of its own, ``make install-fiftyone``: FiftyOne pins a
starlette that the server's FastAPI cannot run with).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nds.api.local_server import LocalServer
from nds_client import NDSClient, Scores, ServerError
from nds_client.errors import InvalidInputError
from nds_client.manifest_dataset import ManifestDataset, read_manifest
from nds_client.manifests import MANIFEST_COLUMNS, format_for_path
from nds_client.storage import Location, read_location
from tests.collections_data import write_parquet, write_shards
from tests.s3 import bucket, s3_server  # noqa: F401 - fixtures
from tests.test_client import INDEX_ARGS, NDS, cli, write_backbone

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: the FiftyOne environment's python (``make install-fiftyone`` makes it; NDS_FIFTYONE_PYTHON names another)
FIFTYONE_PYTHON = Path(os.environ.get("NDS_FIFTYONE_PYTHON") or REPO / ".venv-fiftyone" / "bin" / "python")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    data = root / "data"
    write_shards(data / "wds", 2, 16)                              # labels "0"/"1" from .cls
    write_parquet(data / "hf" / "train.parquet", 32, row_group_size=8)  # labels cat/dog (ClassLabel)
    write_shards(data / "i2d", 2, 12, sidecars="img2dataset")       # url, caption, key in the .json sidecars
    backbone = write_backbone(data / "backbone.onnx")
    env = {**os.environ, "NDS_HOME": str(root / "home"), "NDS_DATA_ROOTS": str(data), "NDS_DATABASE_URL": "",
           "NDS_BROKER_URL": "", "NDS_QDRANT_URL": "", "COLUMNS": "200"}

    def nds(*args: str) -> str:
        done = subprocess.run([NDS, *args], env=env, cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"nds {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    nds("db", "upgrade")
    for name, path, source in (("wds", "wds", "webdataset"), ("hf", "hf/train.parquet", "parquet"), ("i2d", "i2d", "webdataset")):
        nds("datasets", "add", name, str(data / path), "--source", source)
        nds("index", name, *INDEX_ARGS, "--backbone", f"onnx:{backbone}", "--json")
    with LocalServer(env, root / "serve.log", cwd=root) as serving, NDSClient(serving.url) as client:
        names = {int(d["id"]): d["name"] for d in client.datasets()}
        experts: dict[str, list[int]] = {}
        for e in client.experts(kind="rotation"):
            experts.setdefault(names[int(e["dataset_id"])], []).append(int(e["id"]))
        yield SimpleNamespace(url=serving.url, root=root, data=data, client=client, experts=experts,
                              ids={name: i for i, name in names.items()})


def scores_file(served, path: Path, *datasets: str) -> Path:
    """A scores file (what `nds-client score` writes) giving every rotation expert of ``datasets`` the same score."""
    chosen = {e: 0.5 for name in datasets for e in served.experts[name]}
    return Scores(method="rotation", num_images=10, skipped=0, scores=chosen, experts=[]).save(path)


def query(served, budget: int, *datasets: str, seed: int = 0) -> dict:
    chosen = {e: 0.5 for name in datasets for e in served.experts[name]}
    return served.client.query(chosen, budget=budget, seed=seed, datasets=[served.ids[n] for n in datasets])


def rows_of(served, query_id: str, tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in served.client.manifest(query_id, tmp_path / f"{query_id}.jsonl").read_text().splitlines()]


def source_bytes(row: dict) -> bytes:
    """The image of a manifest row as stored in the source (the server's uris are absolute here)."""
    return read_location(Location(row["uri"], row["shard"], row["offset"], row["size"]))


# --------------------------------------------------------------------------- manifests


def test_manifest_rows_locate_tar_members_and_parquet_rows(served, tmp_path):
    answer = query(served, 40, "wds", "hf", seed=1)
    rows = rows_of(served, answer["id"], tmp_path)
    assert sum(r["count"] for r in rows) == 40 and len(rows) == answer["summary"]["unique_samples"]
    assert set(MANIFEST_COLUMNS) <= set(rows[0])
    by_dataset = {r["dataset"] for r in rows}
    assert by_dataset == {"wds", "hf"}
    for row in rows:
        assert row["shard"] is not None and row["offset"] is not None
        if row["dataset"] == "wds":  # a tar member: one ranged read of size bytes at offset
            assert row["shard"].endswith(".tar") and row["uri"].startswith(row["shard"] + "#") and row["size"] > 0
            with tarfile.open(row["shard"]) as tar:
                member = tar.getmember(row["uri"].split("#", 1)[1])
            assert (member.offset_data, member.size) == (row["offset"], row["size"])
        else:  # a Parquet row: its number in the file
            assert row["shard"].endswith("train.parquet") and 0 <= row["offset"] < 32
        Image.open(io.BytesIO(source_bytes(row))).verify()


def test_parquet_manifest_loads_with_datasets(served, tmp_path):
    import datasets

    answer = query(served, 30, "wds", "hf", seed=2)
    path = served.client.manifest(answer["id"], tmp_path / "m.parquet")
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.column_names == list(MANIFEST_COLUMNS)
    assert len(loaded) == answer["summary"]["unique_samples"] and sum(loaded["count"]) == 30
    assert all(isinstance(o, int) for o in loaded["offset"]) and all(s.endswith((".tar", ".parquet")) for s in loaded["shard"])
    tar_rows = [r for r in loaded if r["shard"].endswith(".tar")]
    assert tar_rows and all(r["size"] > 0 for r in tar_rows)


# --------------------------------------------------------------------------- webdataset


def test_webdataset_export_reads_with_webdatasets_own_reader(served, tmp_path):
    import webdataset as wds

    scores = scores_file(served, tmp_path / "scores.json", "wds", "hf")
    out = tmp_path / "shards"
    result = cli("query", "--server", served.url, "--scores", str(scores), "--budget", "50", "--seed", "3",
                 "--datasets", f"{served.ids['wds']},{served.ids['hf']}", "-o", str(out), "--format", "webdataset", "--shard-size", "7")
    assert result.exit_code == 0, result.output
    shards = sorted(out.iterdir())
    names = [p.name for p in shards]
    assert names == [f"shard-{i:05d}.tar" for i in range(len(names))], names
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False).decode("pil"))
    per_shard = []
    for p in shards:
        with tarfile.open(p) as tar:
            per_shard.append(sum(name.endswith(".json") for name in tar.getnames()))
    assert per_shard[:-1] == [7] * (len(shards) - 1) and 1 <= per_shard[-1] <= 7 and sum(per_shard) == len(samples)
    assert sum(s["json"]["count"] for s in samples) == 50  # each selected image once, with its count
    assert len({s["__key__"] for s in samples}) == len(samples)
    for s in samples:
        image = s.get("png")
        assert image is not None and image.size == (32, 32), sorted(s)
        meta = s["json"]
        assert s["__key__"] == meta["key"].replace("/", "-") and meta["dataset"] in ("wds", "hf")
        assert set(meta) >= {"count", "label", "key", "dataset", "cluster", "weight", "uri"}
    for s in samples[:10]:  # the bytes are the source's, exactly
        assert s["png"].tobytes() == Image.open(io.BytesIO(stored_bytes(s["json"]["uri"]))).convert("RGB").tobytes()
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
        record = json.loads(tar.extractfile(members[0]).read())
        image = tar.extractfile(members[1]).read()
    assert members[0].name.endswith(".json") and members[1].name == members[0].name[:-5] + ".png"
    assert image == stored_bytes(record["uri"])


def stored_bytes(uri: str) -> bytes:
    """What the source holds at a sample's uri: a tar member (``SHARD#MEMBER``) or a Parquet row (``FILE#row=N&column=C``)."""
    container, _, inside = uri.partition("#")
    if container.endswith(".tar"):
        with tarfile.open(container) as tar:
            return tar.extractfile(inside).read()
    return read_location(Location(uri, container, int(inside.split("&")[0].removeprefix("row="))))


def test_webdataset_exporter_streams_sample_by_sample_and_is_reproducible():
    from nds.plugins.exporters.webdataset import WebDatasetExporter

    image = bytes(range(256)) * 64  # 16 KiB per sample
    rows = ({"key": f"d/{i}", "uri": f"/x/{i}.png", "label": None, "dataset": "d", "cluster": 0, "weight": 1.0, "count": 1,
             "shard": None, "offset": None, "size": None, "meta": None} for i in range(3000))
    pieces = WebDatasetExporter().stream((list(chunk) for chunk in _chunks(rows, 500)), read_image=lambda row: image)
    sizes = [len(p) for p in pieces]
    assert len(sizes) == 3001 and max(sizes) < len(image) + 20_000  # one sample at a time, never the whole selection
    once = b"".join(WebDatasetExporter().stream([[{**_row(1)}]], read_image=lambda row: b"\x89PNG\r\n\x1a\nxyz"))
    again = b"".join(WebDatasetExporter().stream([[{**_row(1)}]], read_image=lambda row: b"\x89PNG\r\n\x1a\nxyz"))
    assert once == again
    with tarfile.open(fileobj=io.BytesIO(once)) as tar:
        assert tar.getnames() == ["d-1.json", "d-1.png"]  # a Parquet cell without a name: the suffix from its bytes


def _row(i: int) -> dict:
    return {"key": f"d/{i}", "uri": f"/x/f.parquet#row={i}&column=image", "label": "a", "dataset": "d", "cluster": 0, "weight": 1.0,
            "count": 2, "shard": "/x/f.parquet", "offset": i, "size": None, "meta": None}


def _chunks(rows, n):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def test_sample_keys_are_tar_safe_and_distinct():
    from nds.plugins.exporters.webdataset import sample_key

    assert sample_key("cats/12") == "cats-12"
    odd = [sample_key(k) for k in ("my.data/1", "my_data/1", "my data/1", "x/y/1", "é/1", "a" * 200 + "/1")]
    assert len(set(odd)) == len(odd) and odd[1] == "my_data-1"
    assert all("." not in k and "/" not in k and len(k) < 90 for k in odd)


# --------------------------------------------------------------------------- img2dataset


def test_img2dataset_export_keeps_url_caption_and_key(served, tmp_path):
    answer = query(served, 30, "i2d", seed=4)
    path = served.client.manifest(answer["id"], tmp_path / "subset.parquet", format="img2dataset")
    table = pq.read_table(path)
    assert table.column_names == ["url", "caption", "key", "count", "nds_key"]
    got = table.to_pylist()
    assert len(got) == answer["summary"]["unique_samples"] and sum(r["count"] for r in got) == 30
    for r in got:
        assert r["url"] == f"https://example.com/{r['key']}.jpg" and r["caption"].startswith("a picture of ")
        assert r["nds_key"].startswith("i2d/")
    assert pq.read_metadata(path).metadata[b"nds.rows_without_url"] == b"0"


def test_img2dataset_export_of_a_source_without_urls_is_refused(served, tmp_path):
    answer = query(served, 10, "wds", seed=5)
    target = tmp_path / "subset.parquet"
    with pytest.raises(ServerError) as info:
        served.client.manifest(answer["id"], target, format="img2dataset")
    assert info.value.status_code == 422 and info.value.field == "format"
    assert "url" in str(info.value) and "img2dataset" in str(info.value) and not target.exists()


# --------------------------------------------------------------------------- imagefolder, ManifestDataset


def test_imagefolder_export_of_shard_samples_loads_in_torchvision(served, tmp_path):
    import torchvision

    scores = scores_file(served, tmp_path / "scores.json", "wds", "hf")
    tree = tmp_path / "tree"
    result = cli("query", "--server", served.url, "--scores", str(scores), "--budget", "40", "--seed", "6",
                 "--datasets", f"{served.ids['wds']},{served.ids['hf']}", "-o", str(tree), "--format", "imagefolder")
    assert result.exit_code == 0, result.output
    folder = torchvision.datasets.ImageFolder(tree)
    assert len(folder) == 40  # a sample drawn n times is n files
    assert set(folder.classes) <= {"0", "1", "cat", "dog"} and len(folder.classes) >= 2
    files = [Path(p) for p, _ in folder.samples]
    assert all(not p.is_symlink() for p in files)  # tar members and Parquet rows: the bytes written, no link
    assert {p.suffix for p in files} == {".png"}
    image, _ = folder[0]
    assert image.size == (32, 32)
    labels = json.loads((tree / "labels.json").read_text())
    assert set(labels) == set(folder.classes)


def test_imagefolder_export_loads_in_fiftyone(served, tmp_path):
    """FiftyOne's importer of an ImageClassificationDirectoryTree on the imagefolder export."""
    if not FIFTYONE_PYTHON.exists():
        pytest.skip(f"no FiftyOne environment at {FIFTYONE_PYTHON} (make install-fiftyone: FiftyOne "
                    "pins a starlette the server's FastAPI does not run with, so it lives in a virtual environment of its own)")
    scores = scores_file(served, tmp_path / "scores.json", "wds", "hf")
    tree = tmp_path / "tree"
    result = cli("query", "--server", served.url, "--scores", str(scores), "--budget", "25", "--seed", "7",
                 "--datasets", f"{served.ids['wds']},{served.ids['hf']}", "-o", str(tree), "--format", "imagefolder")
    assert result.exit_code == 0, result.output
    script = (
        "import json, sys\n"
        "import fiftyone as fo\n"
        "ds = fo.Dataset.from_dir(dataset_dir=sys.argv[1], dataset_type=fo.types.ImageClassificationDirectoryTree)\n"
        "ds.compute_metadata()\n"
        "print(json.dumps({'n': len(ds), 'labels': ds.count_values('ground_truth.label'),"
        " 'sizes': sorted({(s.metadata.width, s.metadata.height) for s in ds})}))\n"
    )
    home = tmp_path / "fiftyone"
    env = {**os.environ, "FIFTYONE_DATABASE_DIR": str(home / "db"), "FIFTYONE_DO_NOT_TRACK": "true",
           "FIFTYONE_DATABASE_VALIDATION": "false", "HOME": str(home)}
    done = subprocess.run([str(FIFTYONE_PYTHON), "-c", script, str(tree)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    names = {p.name: len([f for f in p.iterdir()]) for p in tree.iterdir() if p.is_dir()}
    assert found["n"] == 25 and found["labels"] == names and found["sizes"] == [[32, 32]]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_dataset_reads_members_and_rows_in_dataloader_workers(served, tmp_path, fmt):
    import torch
    import torchvision
    from torch.utils.data import DataLoader

    answer = query(served, 36, "wds", "hf", seed=8)
    path = served.client.manifest(answer["id"], tmp_path / f"m.{fmt}")
    ds = ManifestDataset(path, transform=torchvision.transforms.ToTensor())
    kinds = {("tar" if r["shard"].endswith(".tar") else "parquet") for r in ds.rows}
    assert kinds == {"tar", "parquet"} and all(isinstance(r["offset"], int) for r in ds.rows)
    loader = DataLoader(ds, batch_size=8, sampler=ds.sampler(generator=torch.Generator().manual_seed(0)), num_workers=2)
    seen = 0
    for images, targets in loader:
        assert images.shape[1:] == (3, 32, 32) and (targets >= 0).all()
        seen += len(targets)
    assert seen == 36  # every row count times per epoch
    expected = np.asarray(Image.open(io.BytesIO(source_bytes(ds.rows[0]))).convert("RGB"))
    assert np.array_equal((ds[0][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), expected)


def test_manifest_dataset_with_relative_uris_needs_a_data_root(served, tmp_path):
    """A client key's manifest names uris and shards relative to the data root."""
    from torch.utils.data import DataLoader

    answer = query(served, 20, "wds", "hf", seed=9)
    rows = rows_of(served, answer["id"], tmp_path)
    root = str(served.data) + "/"
    relative = tmp_path / "relative.csv"
    import csv

    with relative.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for r in rows:
            r = {**r, "uri": r["uri"].removeprefix(root), "shard": r["shard"].removeprefix(root)}
            writer.writerow(["" if r[c] is None else r[c] for c in MANIFEST_COLUMNS])
    assert not read_manifest(relative)[0]["shard"].startswith("/")
    with pytest.raises(InvalidInputError) as info:
        ManifestDataset(relative)
    assert info.value.field == "data_root"
    ds = ManifestDataset(relative, data_root=served.data)
    assert len(list(DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda x: x))) == len(rows)


def test_manifest_dataset_reads_shards_in_object_storage(served, tmp_path, bucket):
    """Tar members and Parquet rows in S3 (moto on loopback), through fsspec, in DataLoader workers."""
    from torch.utils.data import DataLoader

    prefix = bucket.upload_folder(served.data, "data")
    answer = query(served, 20, "wds", "hf", seed=10)
    rows = rows_of(served, answer["id"], tmp_path)
    root = str(served.data)
    manifest = tmp_path / "s3.jsonl"
    manifest.write_text("".join(json.dumps({**r, "uri": r["uri"].replace(root, prefix, 1), "shard": r["shard"].replace(root, prefix, 1)}) + "\n"
                                for r in rows))
    ds = ManifestDataset(manifest)
    assert all(loc.shard.startswith("s3://") for loc in ds.locations)
    got = [image for image, _ in DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda x: x)]
    assert len(got) == len(rows) and all(im.size == (32, 32) for im in got)
    assert np.array_equal(np.asarray(got[0]), np.asarray(Image.open(io.BytesIO(source_bytes(rows[0]))).convert("RGB")))


def test_format_names():
    assert format_for_path("m.parquet") == "parquet" and format_for_path("m.tar") == "webdataset"

