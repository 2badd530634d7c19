"""Turning rows into responses, and the response documentation every route shares."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import responses

from devyard.server.database.tables import ResourceRow
from devyard.server.store import resources
from devyard.wire.meta import ErrorEnvelope

__all__ = ["ERRORS", "JSONResponse", "resource"]


class JSONResponse(responses.JSONResponse):
    """JSON with orjson: several times faster than the standard library on resource lists."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope, "description": description}
    for code, description in {
        400: "The request makes no sense",
        401: "No valid credentials",
        403: "Not allowed",
        404: "Not found, or not visible to the caller",
        409: "Stale resource_version, or the name is taken",
        422: "The body or query breaks the schema",
    }.items()
}


def resource(row: ResourceRow, status_code: int = 200) -> JSONResponse:
    return JSONResponse(resources.render(row), status_code=status_code)
