"""Serving the ONNX files clients download (experts, backbones): the ETag is the file's sha256."""

from __future__ import annotations

from pathlib import Path

from fastapi import Response
from fastapi.responses import FileResponse

ONNX_RESPONSES = {200: {"content": {"application/octet-stream": {}}}, 304: {"description": "Not modified (If-None-Match)"}}


def file_with_etag(path: Path, *, sha256: str, filename: str, if_none_match: str | None) -> Response:
    """The file, or 304 when ``If-None-Match`` names its sha256."""
    etag = f'"{sha256}"'
    if if_none_match and etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(path, media_type="application/octet-stream", filename=filename, headers={"ETag": etag, "X-Content-SHA256": sha256})
