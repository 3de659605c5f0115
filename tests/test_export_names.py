"""Labels and keys become file and folder names injectively: no two classes or samples merge."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

from nds_client.imagefolder import LABELS_FILE, UNLABELLED, build_tree, label_folder_names


def _portable(names) -> None:
    """Distinct even on a case-insensitive, normalising disk; each one a legal name."""
    names = list(names)
    folded = {unicodedata.normalize("NFD", unicodedata.normalize("NFD", n).casefold()) for n in names}
    assert len(folded) == len(names), names
    for n in names:
        assert n and n not in (".", "..") and len(n.encode("utf-8")) <= 255, n
        assert not any(c in n for c in '/\\\0<>:"|?*') and all(ord(c) >= 32 for c in n), n
        assert n[0] not in " ." and n[-1] not in " .", n


def test_unicode_labels_keep_their_names_and_stay_apart():
    names = label_folder_names(["猫", "犬", "чёрный кот", "chat noir"])
    assert names == {"猫": "猫", "犬": "犬", "чёрный кот": "чёрный кот", "chat noir": "chat noir"}


def test_characters_a_file_system_cannot_hold_are_escaped_reversibly():
    labels = ["chat noir", "chat/noir", "chat\\noir", "chat%2Fnoir", "a:b", "tab\there", "nul\0byte"]
    names = label_folder_names(labels)
    _portable(names.values())
    assert names["chat noir"] == "chat noir" and names["chat/noir"] == "chat%2Fnoir"
    for label in labels:
        assert unquote(names[label]) == label  # percent-decoding gives the label back


def test_case_and_normalisation_collisions_are_told_apart_in_a_fixed_order():
    labels = ["cat", "Cat", "CAT", "café", "cafe\u0301", "cat~2"]
    names = label_folder_names(labels)
    _portable(names.values())
    assert names["CAT"] == "CAT" and names["café"] == "café" and names["cat~2"] == "cat~2"
    assert label_folder_names(reversed(labels)) == names  # independent of the order labels come in


@pytest.mark.parametrize("label", [".", "..", "...", " ", "  ", " cat ", ".hidden", "cat.", "CON", "nul.txt", "Com1"])
def test_dot_space_and_reserved_labels_get_legal_distinct_names(label):
    names = label_folder_names([label, label.strip(" .") or "x", "x"])
    _portable(names.values())
    assert unquote(names[label]) == label


def test_long_labels_fit_and_stay_distinct():
    a, b = "猫" * 100, "猫" * 99 + "犬"  # 300 bytes of UTF-8, equal on the first 297
    names = label_folder_names([a, b, "x" * 300])
    _portable(names.values())
    assert all(name.startswith("猫" * 50) for name in (names[a], names[b]))


def test_unlabelled_bucket_does_not_merge_with_a_label_named_like_it():
    names = label_folder_names([None, "", UNLABELLED])
    assert names[None] == names[""] == UNLABELLED and names[UNLABELLED] != UNLABELLED
    _portable({names[None], names[UNLABELLED]})


def _row(key: str, uri: Path, label: str | None, count: int = 1) -> dict:
    return {"key": key, "uri": str(uri), "label": label, "dataset": key.split("/")[0], "cluster": 0, "weight": 0.1, "count": count}


def test_tree_reads_back_with_torchvision(tmp_path, data_root):
    import torchvision

    from tests.conftest import write_images

    images = write_images(data_root / "imgs", labels=("a",), n=2) / "a"
    labels = {"猫": 2, "犬": 1, "chat noir": 1, "chat/noir": 1, "Cat": 1, "cat": 1, "..": 1, UNLABELLED: 1, None: 1, "x" * 300: 1}
    rows = [_row(f"d{i}/7", images / f"{i % 2}.png", label, count) for i, (label, count) in enumerate(labels.items())]
    rows += [_row("e/7", images / "0.png", "猫"), _row("e-7", images / "1.png", "猫"), _row("E/7", images / "1.png", "猫")]  # same stems
    tree = tmp_path / "tree"
    assert build_tree(iter(rows), tree) == 14
    exact = json.loads((tree / LABELS_FILE).read_text(encoding="utf-8"))
    ds = torchvision.datasets.ImageFolder(tree)
    assert ds.classes == list(exact) and len(ds.classes) == len(labels)  # labels.json lists the classes in index order
    assert {exact[c] for c in ds.classes} == set(labels)
    per_class = {exact[c]: sum(1 for _, t in ds.samples if t == i) for i, c in enumerate(ds.classes)}
    assert per_class == {**labels, "猫": 5}
    assert {"猫", "犬", "chat noir"} <= set(ds.classes)


def test_tree_from_a_jsonl_manifest_names_folders_whatever_the_row_order(tmp_path, data_root):
    from nds_client.imagefolder import JsonlRows
    from tests.conftest import write_images

    image = write_images(data_root / "imgs", labels=("a",), n=1) / "a" / "0.png"
    rows = [_row(f"d/{i}", image, label) for i, label in enumerate(["cat", "Cat", "猫", None, ""])]
    trees = []
    for name, order in (("fwd", rows), ("rev", rows[::-1])):
        manifest = tmp_path / f"{name}.jsonl"
        manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in order), encoding="utf-8")
        assert build_tree(JsonlRows(manifest), tmp_path / name) == 5
        trees.append(json.loads((tmp_path / name / LABELS_FILE).read_text(encoding="utf-8")))
    assert trees[0] == trees[1] == {"Cat": "Cat", UNLABELLED: None, "cat~2": "cat", "猫": "猫"}
    assert sorted(p.name for p in (tmp_path / "fwd" / UNLABELLED).iterdir()) == ["d-3.png", "d-4.png"]


def test_a_client_keys_relative_manifest_needs_the_data_root(tmp_path):
    """Client keys get uris relative to the server's data roots (nds.catalog.uris): the tree
    resolves them against --data-root, and refuses them (writing nothing) without it."""
    import pytest
    from PIL import Image

    from nds_client.errors import InvalidInputError

    root = tmp_path / "mnt"
    (root / "pool").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "pool" / "1.png")
    rows = [{"key": "pool/1", "uri": "pool/1.png", "label": "a", "count": 1}]
    with pytest.raises(InvalidInputError, match="relative to the server's data roots"):
        build_tree(rows, tmp_path / "no-root")
    assert not (tmp_path / "no-root").exists()
    with pytest.raises(InvalidInputError, match="remote file"):
        build_tree([{**rows[0], "uri": "s3://bucket/pool/1.png"}], tmp_path / "remote")
    assert build_tree(rows, tmp_path / "tree", data_root=root) == 1
    (link,) = (tmp_path / "tree" / "a").iterdir()
    assert link.resolve() == (root / "pool" / "1.png").resolve()
