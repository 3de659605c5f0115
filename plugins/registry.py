"""Plugin registries keyed by name, resolved lazily from entry points.

Each registry reads one entry-point group (``nds.sources``, ``nds.backbones``,
``nds.exporters``). Nothing is imported until a plugin is asked for by name. A name may
also be a dotted path (``package.module:Object``) for plugins that are not installed as
distributions. Unknown names fail with the list of known ones and an install hint; two
distributions that claim the same name are an error, never a silent overwrite.

What a plugin is, and the one module a third-party plugin imports, is described in
:mod:`nds.plugins.contract`; this module is the catalog's side (finding and loading them).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from nds_client.errors import PluginError

T = TypeVar("T")


@dataclass(frozen=True)
class PluginInfo:
    group: str
    name: str
    value: str  # "module:attr"
    distribution: str | None


class Registry(Generic[T]):
    """Named plugins of one kind; entry points are read once, objects imported on first use."""

    def __init__(self, group: str, *, kind: str, install_hint: str) -> None:
        self.group = group
        self.kind = kind
        self.install_hint = install_hint
        self._entries: dict[str, EntryPoint] | None = None
        self._loaded: dict[str, T] = {}

    def _discover(self) -> dict[str, EntryPoint]:
        if self._entries is None:
            found: dict[str, EntryPoint] = {}
            for ep in entry_points(group=self.group):
                other = found.get(ep.name)
                if other is not None and other.value != ep.value:
                    raise PluginError(
                        f"two packages register the {self.kind} '{ep.name}': {other.value} and {ep.value}",
                        hint="uninstall one of them",
                    )
                found[ep.name] = ep
            self._entries = found
        return self._entries

    def names(self) -> list[str]:
        return sorted(self._discover())

    def infos(self) -> list[PluginInfo]:
        return [
            PluginInfo(self.group, name, ep.value, ep.dist.name if ep.dist else None)
            for name, ep in sorted(self._discover().items())
        ]

    def get(self, name: str, *, allow_path: bool = True) -> T:
        """The plugin object registered as ``name`` (or at the dotted path ``name``).

        ``allow_path=False`` accepts registered names only: a name that arrives over the
        network must never make the server import a module of the caller's choosing."""
        entries = self._discover()
        if name in self._loaded and (allow_path or name in entries):
            return self._loaded[name]
        try:
            if name in entries:
                obj = entries[name].load()
            elif ":" in name and allow_path:
                module, _, attr = name.partition(":")
                obj = getattr(import_module(module), attr)
            else:
                known = ", ".join(self.names()) or "none"
                raise PluginError(
                    f"unknown {self.kind} '{name}'; known: {known}", hint=self.install_hint
                )
        except PluginError:
            raise
        except (ImportError, AttributeError, ValueError) as exc:
            raise PluginError(
                f"the {self.kind} '{name}' could not be loaded: {exc}", hint=self.install_hint
            ) from exc
        self._loaded[name] = obj
        return obj


def source_registry() -> Registry:
    return Registry(
        "nds.sources",
        kind="source",
        install_hint="install a package that declares an 'nds.sources' entry point, or pass module:Class",
    )


def exporter_registry() -> Registry:
    return Registry(
        "nds.exporters",
        kind="manifest exporter",
        install_hint="install a package that declares an 'nds.exporters' entry point",
    )


def backbone_registry() -> Registry:
    return Registry(
        "nds.backbones",
        kind="backbone",
        install_hint="install a package that declares an 'nds.backbones' entry point",
    )


def all_registries() -> list[Registry]:
    return [source_registry(), backbone_registry(), exporter_registry()]
