"""Test collections written with the real writers: WebDataset shards (webdataset's TarWriter),
img2dataset's layout, Parquet files (pyarrow and ``datasets``), ``save_to_disk`` folders and COCO JSON.

Every image is a small PNG (or JPEG for img2dataset), 32x32 by default; sample ``i`` of a
collection gets the label ``labels[i % len(labels)]`` unless said otherwise.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

LABELS = ("cat", "dog")
COCO_CATEGORIES = ((1, "cat"), (2, "dog"), (7, "eel"))


def image_bytes(i: int, *, size: int = 32, fmt: str = "PNG") -> bytes:
    """A distinct small image for every ``i`` (stripes whose period and phase depend on it)."""
    x = np.zeros((size, size, 3), np.uint8)
    x[:, :: 2 + i % 5] = 255
    x = np.roll(x, i % 7, axis=1)
    x[..., i % 3] //= 2
    x[0, 0] = (i % 256, (i // 256) % 256, 17)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def shard_key(shard: int, i: int) -> str:
    return f"{shard:05d}{i:04d}"


def write_shards(folder: Path, n_shards: int, per_shard: int, *, truncate_last: bool = False, sidecars: str = "cls",
                 labels: tuple[str, ...] = LABELS, member_json: bool = True, size: int = 32) -> list[Path]:
    """``folder/00000.tar`` ... with ``per_shard`` samples each, written with webdataset's TarWriter.

    ``sidecars``: ``"cls"`` (``KEY.png`` + ``KEY.cls``, the label's index), ``"json"`` (``KEY.png`` +
    ``KEY.json`` with ``{"label": NAME, "meta": {"class": NAME}, "index": N}``), or ``"img2dataset"``
    (``KEY.jpg`` + ``KEY.json`` with url/caption/key/status/width/height + ``KEY.txt`` with the caption,
    a ``00000.parquet`` beside each shard and a ``00000_stats.json``; ``member_json=False`` leaves the
    ``.json`` members out, so only the Parquet gives the url). ``truncate_last`` cuts the last shard
    to a third of its bytes. The url of sample KEY is ``https://example.com/KEY.jpg``, its caption
    ``a picture of NAME number N``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from webdataset import TarWriter

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    n = 0
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        rows = []
        with TarWriter(str(path)) as sink:
            for i in range(per_shard):
                key, li = shard_key(s, i), n % len(labels)
                name = labels[li]
                if sidecars == "cls":
                    sink.write({"__key__": key, "png": image_bytes(n, size=size), "cls": li})
                elif sidecars == "json":
                    sink.write({"__key__": key, "png": image_bytes(n, size=size), "json": {"label": name, "meta": {"class": name}, "index": n}})
                elif sidecars == "img2dataset":
                    caption, url = f"a picture of {name} number {n}", f"https://example.com/{key}.jpg"
                    record = {"url": url, "caption": caption, "key": key, "status": "success", "error_message": None,
                              "width": size, "height": size, "original_width": size * 2, "original_height": size * 2}
                    sample = {"__key__": key, "jpg": image_bytes(n, size=size, fmt="JPEG"), "txt": caption}
                    if member_json:
                        sample["json"] = record
                    sink.write(sample)
                    rows.append(record)
                else:
                    raise ValueError(f"unknown sidecars {sidecars!r}")
                n += 1
        if sidecars == "img2dataset":
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{s:05d}.parquet")
            (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard, "failed_to_download": 0}))
        paths.append(path)
    if truncate_last and paths:
        data = paths[-1].read_bytes()
        paths[-1].write_bytes(data[: len(data) // 3])
    return paths


def write_parquet(path: Path, n: int, *, layout: str = "hf", row_group_size: int | None = None,
                  labels: tuple[str, ...] = LABELS, size: int = 32) -> Path:
    """A Parquet file of ``n`` rows.

    ``layout``: ``"hf"`` (written by ``datasets``: ``image`` as ``Image()`` {bytes, path} structs,
    ``label`` a ``ClassLabel`` of ``labels``, names in the schema's ``huggingface`` metadata),
    ``"strings"`` (pyarrow: ``jpg`` binary, ``label`` strings, ``url``/``caption``/``key`` strings),
    or ``"path"`` (pyarrow: ``file_name`` relative paths to PNGs written in ``PATH's folder/files/``,
    ``label`` strings). ``row_group_size`` rows per row group (default: one group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    names = [labels[i % len(labels)] for i in range(n)]
    if layout == "hf":
        import datasets

        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(labels))})
        ds = datasets.Dataset.from_dict({"image": [{"bytes": image_bytes(i, size=size), "path": f"img{i}.png"} for i in range(n)],
                                         "label": [i % len(labels) for i in range(n)]}, features=features)
        ds.to_parquet(str(path), batch_size=row_group_size or max(n, 1))
        return path
    if layout == "strings":
        table = pa.table({"jpg": pa.array([image_bytes(i, size=size) for i in range(n)], pa.binary()), "label": names,
                          "url": [f"https://example.com/{i}.png" for i in range(n)],
                          "caption": [f"a picture of {names[i]}" for i in range(n)], "key": [f"k{i:05d}" for i in range(n)]})
    elif layout == "path":
        files = path.parent / "files"
        files.mkdir(exist_ok=True)
        for i in range(n):
            (files / f"{i}.png").write_bytes(image_bytes(i, size=size))
        table = pa.table({"file_name": [f"files/{i}.png" for i in range(n)], "label": names})
    else:
        raise ValueError(f"unknown layout {layout!r}")
    pq.write_table(table, path, row_group_size=row_group_size or max(n, 1))
    return path


def write_saved(folder: Path, n: int, *, labels: tuple[str, ...] = LABELS, size: int = 32) -> Path:
    """A dataset written by ``datasets.save_to_disk`` (``image`` Image(), ``label`` ClassLabel) in ``folder``."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(labels))})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": image_bytes(i, size=size), "path": None} for i in range(n)],
                                     "label": [i % len(labels) for i in range(n)]}, features=features)
    ds.save_to_disk(str(folder))
    return folder


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the start of row group ``group``'s first column chunk (its page header) with garbage;
    the footer stays intact, so the file opens and the other groups read."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(group).column(0)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 48] = b"\xff" * 48
    path.write_bytes(bytes(data))


def write_coco(folder: Path, n: int, missing: int = 0, *, split: str = "val", size: int = 32) -> Path:
    """``folder/annotations/instances_SPLIT.json`` and ``folder/SPLIT/<i:06d>.png`` (COCO's layout).

    Categories: :data:`COCO_CATEGORIES` (ids 1, 2, 7). Image ``i`` (id ``100 + i``) has two
    annotations: a small one (``area`` 10) of category ``i % 3`` and a larger one (no area, a
    ``bbox`` of 10 x 20) of category ``(i + 1) % 3``, so its label is ``(i + 1) % 3``'s name and
    its categories ``[that, i % 3's]``; the last image has no annotations (no label). The last
    ``missing`` images before it are listed in the JSON but not written."""
    images_dir = folder / split
    images_dir.mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        name = f"{i:06d}.png"
        images.append({"id": 100 + i, "file_name": name, "width": size, "height": size})
        if not (n - 1 - missing <= i < n - 1):
            (images_dir / name).write_bytes(image_bytes(i, size=size))
        if i == n - 1:
            continue
        annotations.append({"id": 2 * i, "image_id": 100 + i, "category_id": COCO_CATEGORIES[i % 3][0], "area": 10.0,
                            "bbox": [0, 0, 2, 5], "iscrowd": 0})
        annotations.append({"id": 2 * i + 1, "image_id": 100 + i, "category_id": COCO_CATEGORIES[(i + 1) % 3][0],
                            "bbox": [1, 1, 10, 20], "iscrowd": 0})
    doc = {"info": {"description": "test"}, "images": images, "annotations": annotations,
           "categories": [{"id": cid, "name": name, "supercategory": "animal"} for cid, name in COCO_CATEGORIES]}
    path = folder / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(doc))
    return path


def coco_expected(n: int) -> list[tuple[str | None, list[str]]]:
    """(label, categories) of each image :func:`write_coco` writes."""
    names = [name for _, name in COCO_CATEGORIES]
    return [(names[(i + 1) % 3], [names[(i + 1) % 3], names[i % 3]]) if i < n - 1 else (None, []) for i in range(n)]
