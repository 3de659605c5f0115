"""Built-in manifest exporter plugins (``nds.exporters``): turn a query's rows into a file format, streamed.

They import only :mod:`nds.plugins.contract`, like a third-party exporter would.
"""
