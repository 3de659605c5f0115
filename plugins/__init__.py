"""Plugins of the Neural Data Server: dataset sources, embedding backbones, manifest exporters.

A plugin, built in or third-party, imports :mod:`nds.plugins.contract` (the base classes, the
errors and helpers it may use) and is found through the entry-point groups ``nds.sources``,
``nds.backbones`` and ``nds.exporters`` (:mod:`nds.plugins.registry`).
"""
