"""Manifest exporter plugins: turn a query's rows into a file format, streamed."""
