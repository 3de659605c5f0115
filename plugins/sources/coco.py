"""``coco``: a COCO instances JSON (``instances_train2017.json``) and its image folder, local or in object storage.

The location is the JSON file. The images are in the folder the option ``images`` names
(relative to the JSON's folder, or absolute, or ``s3://``); by default the folder named after
the JSON without ``instances_`` (``instances_train2017.json`` -> ``train2017``) beside the
JSON or, for a JSON in an ``annotations/`` folder as COCO ships it, beside that folder; else
``images/`` there.

One sample per entry of ``images``, in the JSON's order, at ``IMAGES/<file_name>``. Its label
is the category name of its largest annotation (by ``area``, else by its ``bbox``'s width x
height; the first one on a tie), none without annotations; its ``meta`` keeps
``categories`` (the names of every category it is annotated with, the label's first, then
by their largest annotation) and ``coco_id`` (the image's id). Its parts are the image
files: ``nds datasets sync`` registers images added to the JSON since.

A malformed JSON is an error naming the place (``instances_val2017.json: images[3].file_name:
missing``, or the line and column of a syntax error), before anything is stored; images
listed but missing from the folder are skipped and counted by the registration.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from nds.plugins.contract import Source, SourceError, SourceItem
from nds_client.storage import is_remote, join

HINT = "a COCO instances JSON: {\"images\": [{\"id\", \"file_name\"}], \"annotations\": [{\"image_id\", \"category_id\", \"area\" or \"bbox\"}], " \
       "\"categories\": [{\"id\", \"name\"}]}"


@dataclass
class _Image:
    uri: str
    coco_id: Any
    index: int
    best: dict[str, tuple[float, int]]  # category name -> (its largest annotation's size, -its position), for ordering


def _is_id(value: Any) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class CocoSource(Source):
    name = "coco"
    description = "a COCO instances JSON and its image folder (local or s3://); label: the category of the largest annotation"
    options = {
        "images": "the image folder, relative to the JSON's folder or absolute (default: instances_NAME.json -> NAME/ beside "
                  "the JSON or beside its annotations/ folder, else images/)",
    }

    def __init__(self, location: str, env, **options: str) -> None:  # noqa: ANN001 - SourceEnv
        super().__init__(location, env, **options)
        self.file_name = PurePosixPath(location).name
        if not env.exists(location) or env.is_dir(location):
            raise SourceError(f"{location} is not a file", field="path", hint="name the instances JSON (annotations/instances_train2017.json)")
        if PurePosixPath(location).suffix.lower() != ".json":
            raise SourceError(f"{self.file_name}: a COCO source is a .json file", field="path", hint=HINT)
        self.images_folder = self._images_folder((options.get("images") or "").strip() or None)
        self._images: list[_Image] | None = None

    def _images_folder(self, given: str | None) -> str:
        here = self.location.rsplit("/", 1)[0]
        if given is not None:
            folder = given if is_remote(given) or given.startswith("/") else join(here, given)
            if not (self.env.exists(folder) and self.env.is_dir(folder)):
                raise SourceError(f"the images folder {folder} does not exist (option images)", field="images",
                                  hint="-O images=FOLDER, relative to the JSON's folder or absolute")
            return self.env.check(folder)
        stem = PurePosixPath(self.location).stem
        named = stem.removeprefix("instances_") or "images"
        bases = [here]
        if PurePosixPath(here).name == "annotations":
            bases.append(here.rsplit("/", 1)[0])
        tried = [join(base, name) for name in dict.fromkeys((named, "images")) for base in bases]
        for folder in tried:
            if self.env.exists(folder) and self.env.is_dir(folder):
                return self.env.check(folder)
        raise SourceError(f"{self.file_name}: no image folder found (looked for {', '.join(tried)})", field="images",
                          hint="-O images=FOLDER, relative to the JSON's folder or absolute")

    # ------------------------------------------------------------------ reading the JSON

    def _fail(self, where: str, problem: str) -> SourceError:
        return SourceError(f"{self.file_name}: {where}: {problem}", field="path", hint=HINT)

    def _load(self) -> list[_Image]:
        if self._images is not None:
            return self._images
        try:
            doc = json.loads(self.env.read_bytes(self.location))
        except UnicodeDecodeError as exc:
            raise SourceError(f"{self.file_name} is not UTF-8 text: {exc}", field="path", hint=HINT) from exc
        except json.JSONDecodeError as exc:
            raise SourceError(f"{self.file_name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                              field="path", hint=HINT) from exc
        if not isinstance(doc, dict):
            raise self._fail("$", "expected a JSON object with images, annotations and categories")
        images = self._list(doc, "images", required=True)
        categories = self._categories(self._list(doc, "categories", required=False))
        out: list[_Image] = []
        by_id: dict[Any, _Image] = {}
        seen_files: dict[str, int] = {}
        for i, entry in enumerate(images):
            where = f"images[{i}]"
            if not isinstance(entry, dict):
                raise self._fail(where, "expected an object")
            coco_id = entry.get("id")
            if coco_id is None:
                raise self._fail(f"{where}.id", "missing")
            if not _is_id(coco_id):
                raise self._fail(f"{where}.id", f"expected an integer or a string, got {json.dumps(coco_id)}")
            if coco_id in by_id:
                raise self._fail(f"{where}.id", f"{coco_id} is already the id of images[{by_id[coco_id].index}]")
            file_name = entry.get("file_name")
            if file_name is None:
                raise self._fail(f"{where}.file_name", "missing")
            if not isinstance(file_name, str) or not file_name.strip():
                raise self._fail(f"{where}.file_name", f"expected a file name, got {json.dumps(file_name)}")
            if file_name in seen_files:
                raise self._fail(f"{where}.file_name", f"{file_name} is already listed at images[{seen_files[file_name]}]")
            seen_files[file_name] = i
            image = _Image(join(self.images_folder, file_name.strip()), coco_id, i, {})
            by_id[coco_id] = image
            out.append(image)
        for j, ann in enumerate(self._list(doc, "annotations", required=False)):
            where = f"annotations[{j}]"
            if not isinstance(ann, dict):
                raise self._fail(where, "expected an object")
            image = by_id.get(ann.get("image_id")) if _is_id(ann.get("image_id")) else None
            if image is None:
                problem = "missing" if "image_id" not in ann else f"no image has the id {json.dumps(ann['image_id'])}"
                raise self._fail(f"{where}.image_id", problem)
            name = categories.get(ann.get("category_id")) if _is_id(ann.get("category_id")) else None
            if name is None:
                problem = "missing" if "category_id" not in ann else f"no category has the id {json.dumps(ann['category_id'])}"
                raise self._fail(f"{where}.category_id", problem)
            image.best[name] = max(image.best.get(name, (-1.0, 0)), (self._size(ann, where), -j))
        self._images = out
        return out

    def _list(self, doc: dict, key: str, *, required: bool) -> list:
        value = doc.get(key)
        if value is None:
            if required:
                raise self._fail(key, "missing")
            return []
        if not isinstance(value, list):
            raise self._fail(key, f"expected a list, got {type(value).__name__}")
        return value

    def _categories(self, entries: list) -> dict[Any, str]:
        names: dict[Any, str] = {}
        for k, entry in enumerate(entries):
            where = f"categories[{k}]"
            if not isinstance(entry, dict):
                raise self._fail(where, "expected an object")
            cid, name = entry.get("id"), entry.get("name")
            if not _is_id(cid):
                raise self._fail(f"{where}.id", "missing" if cid is None else f"expected an integer or a string, got {json.dumps(cid)}")
            if cid in names:
                raise self._fail(f"{where}.id", f"{cid} is already the id of {names[cid]!r}")
            if not isinstance(name, str) or not name.strip():
                raise self._fail(f"{where}.name", "missing" if name is None else f"expected a name, got {json.dumps(name)}")
            names[cid] = name.strip()
        return names

    def _size(self, ann: dict, where: str) -> float:
        """An annotation's size: its area, else its bbox's width x height, else 0."""
        if ann.get("area") is not None:
            area = _number(ann["area"])
            if area is None:
                raise self._fail(f"{where}.area", f"expected a number, got {json.dumps(ann['area'])}")
            return area
        bbox = ann.get("bbox")
        if bbox is None:
            return 0.0
        if not isinstance(bbox, list) or len(bbox) != 4 or any(_number(v) is None for v in bbox):
            raise self._fail(f"{where}.bbox", f"expected [x, y, width, height], got {json.dumps(bbox)[:80]}")
        return float(bbox[2]) * float(bbox[3])

    # ------------------------------------------------------------------ the contract

    def parts(self) -> list[str]:
        return [image.uri for image in self._load()]

    def items(self, parts: Sequence[str] | None = None) -> Iterator[SourceItem]:
        wanted = set(parts) if parts is not None else None
        for image in self._load():
            if wanted is not None and image.uri not in wanted:
                continue
            ranked = sorted(image.best, key=lambda name: image.best[name], reverse=True)
            meta = {"categories": ranked, "coco_id": image.coco_id}
            yield SourceItem(image.uri, ranked[0] if ranked else None, f"{self.file_name}: images[{image.index}]", meta=meta)
