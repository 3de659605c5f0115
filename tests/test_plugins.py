"""Plugin registries: entry points, lazy loading, dotted paths, unknown names, collisions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nds.plugins.registry import Registry, source_registry
from nds_client.errors import PluginError


def install_fake_distribution(site: Path, name: str, entry_points: str, module_src: str | None = None) -> None:
    """A real installed distribution (dist-info + entry_points.txt) on a sys.path entry."""
    dist = site / f"{name.replace('-', '_')}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)
    if module_src:
        (site / f"{name.replace('-', '_')}.py").write_text(module_src)


THIRD_PARTY = '''
from pathlib import Path
from nds.plugins.contract import Source, SourceItem

class ListSource(Source):
    """Reads a text file with one image path per line."""
    name = "listfile"
    def items(self):
        for i, line in enumerate(self.path.read_text().splitlines(), start=1):
            if line.strip():
                yield SourceItem(self.path.parent / line.strip(), None, f"line {i}")
'''


def test_builtin_sources_are_entry_points():
    registry = source_registry()
    assert {"imagefolder", "manifest"} <= set(registry.names())
    assert registry.get("imagefolder").name == "imagefolder"


def test_unknown_name_lists_known_and_hints():
    with pytest.raises(PluginError) as info:
        source_registry().get("zip")
    assert "known: coco, imagefolder, manifest, parquet, webdataset" in str(info.value) and "entry point" in str(info.value)


def test_dotted_path_and_broken_path():
    registry = source_registry()
    assert registry.get("nds.plugins.sources.manifest:ManifestSource").name == "manifest"
    with pytest.raises(PluginError, match="could not be loaded"):
        registry.get("nds.plugins.sources.nothing:Nope")


def test_third_party_entry_point_registers_a_source(tmp_path, monkeypatch, ctx, data_root):
    """A package that declares an nds.sources entry point becomes usable by name."""
    from nds.catalog.jobs import InlineDispatcher
    from nds.catalog.registration import RegistrationRequest, start_registration
    from tests.conftest import write_images

    site = tmp_path / "site"
    install_fake_distribution(site, "nds-listfile", "[nds.sources]\nlistfile = nds_listfile:ListSource\n", THIRD_PARTY)
    monkeypatch.syspath_prepend(str(site))
    registry = source_registry()
    assert "listfile" in registry.names()
    ctx.sources = registry
    folder = write_images(data_root / "imgs", n=2)
    listing = data_root / "list.txt"
    listing.write_text("imgs/a/0.png\nimgs/b/1.png\n")
    dataset, job = start_registration(ctx, RegistrationRequest(name="listed", path=str(listing), source="listfile"))
    InlineDispatcher(ctx).submit(job)
    from sqlmodel import Session

    from nds.catalog.tables import Dataset

    with Session(ctx.engine) as session:
        assert session.get(Dataset, dataset.id).num_samples == 2
    assert folder.exists()


def test_name_collision_is_an_error(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install_fake_distribution(site, "pkg-one", "[nds.test]\nsame = pkg_one:A\n")
    install_fake_distribution(site, "pkg-two", "[nds.test]\nsame = pkg_two:B\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(PluginError, match="two packages register"):
        Registry("nds.test", kind="thing", install_hint="-").names()


def test_loading_is_lazy(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install_fake_distribution(site, "pkg-lazy", "[nds.lazy]\nboom = pkg_lazy_mod:X\n")
    (site / "pkg_lazy_mod.py").write_text("raise RuntimeError('imported too early')\n")
    monkeypatch.syspath_prepend(str(site))
    registry = Registry("nds.lazy", kind="thing", install_hint="-")
    assert registry.names() == ["boom"]  # listing imports nothing
    assert "pkg_lazy_mod" not in sys.modules


def test_the_contract_is_what_a_plugin_imports(tmp_path):
    """nds.plugins.contract names everything a plugin needs, from the one place each lives."""
    import nds_client.errors as errors
    import nds_client.files as files
    import nds_client.manifests as manifests
    import nds_client.preprocessing as preprocessing
    import nds_client.storage as storage
    from nds.catalog.artifacts import ArtifactStore
    from nds.plugins import contract

    assert sorted(contract.__all__) == sorted(
        ["Source", "SourceItem", "Backbone", "BackboneEnv", "ArtifactAccess", "IMAGENET_MEAN", "IMAGENET_STD", "to_nchw",
         "normalize_rows", "sha256_file", "Exporter", "Row", "MANIFEST_COLUMNS", "PluginError", "SourceError",
         "InvalidInputError", "ArtifactError", "SkippedPart", "SourceEnv", "parquet_row_uri", "image_value_bytes", "IMAGE_SUFFIXES",
         "ImageReader", "Location", "read_location", "StorageError", "StorageUnavailable"])
    assert all(hasattr(contract, name) for name in contract.__all__)
    # re-exported, never redefined
    assert contract.MANIFEST_COLUMNS is manifests.MANIFEST_COLUMNS
    assert (contract.to_nchw, contract.normalize_rows) == (preprocessing.to_nchw, preprocessing.normalize_rows)
    assert (contract.IMAGENET_MEAN, contract.IMAGENET_STD) == (preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD)
    assert contract.sha256_file is files.sha256_file
    assert contract.PluginError is errors.PluginError and contract.SourceError is errors.SourceError
    assert contract.StorageError is errors.StorageError and contract.read_location is storage.read_location
    # the catalog's store is what a backbone is handed, through the protocol only
    assert isinstance(ArtifactStore(tmp_path), contract.ArtifactAccess)
    assert not hasattr(contract.Backbone, "collection")  # the catalog names collections
    with pytest.raises(contract.InvalidInputError, match="no file paths"):
        contract.BackboneEnv(artifacts=ArtifactStore(tmp_path)).resolve_path("/etc/passwd")


def test_the_client_knows_every_manifest_format_the_server_streams():
    """The manifest formats are the exporters; the client's table of them (nds_client.manifests,
    which it cannot read from the server's entry points) must name the same formats and suffixes."""
    from nds.plugins.registry import exporter_registry
    from nds_client.manifests import MANIFEST_FORMATS

    exporters = exporter_registry()
    assert sorted(exporters.names()) == sorted(MANIFEST_FORMATS)
    for name in exporters.names():
        assert exporters.get(name).suffix == MANIFEST_FORMATS[name]
