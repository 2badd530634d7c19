"""Listing and watching, the same way for every kind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Query
from fastapi.responses import StreamingResponse

from devyard.server.api.context import Context
from devyard.server.api.responses import JSONResponse
from devyard.server.store import resources
from devyard.server.store.errors import Invalid
from devyard.server.watch import watch_events

__all__ = ["ListParams", "list_params", "list_response", "narrow", "parse_labels"]


@dataclass
class ListParams:
    organization_id: str | None
    page_size: int
    page_token: str | None
    watch: bool
    resource_version: str | None
    bookmark_seconds: float | None
    timeout_seconds: float | None
    labels: dict[str, str]


def parse_labels(values: list[str]) -> dict[str, str]:
    labels = {}
    for value in values:
        key, sep, label = value.partition("=")
        if not sep or not key:
            raise Invalid(f"label filter {value!r} must be KEY=VALUE")
        labels[key] = label
    return labels


def list_params(
    organization_id: str | None = None,
    page_size: int = Query(100, ge=1, le=1000),
    page_token: str | None = Query(None, max_length=200),
    watch: bool = False,
    resource_version: str | None = Query(None, max_length=30),
    bookmark_seconds: float | None = Query(None, gt=0, le=3600),
    timeout_seconds: float | None = Query(None, gt=0, le=86400),
    label: list[str] = Query(default_factory=list, description="KEY=VALUE; repeatable"),
) -> ListParams:
    return ListParams(
        organization_id,
        page_size,
        page_token,
        watch,
        resource_version,
        bookmark_seconds,
        timeout_seconds,
        parse_labels(label),
    )


async def list_response(ctx: Context, kind: str, query: resources.Query, params: ListParams) -> Any:
    """A page of the kind as JSON, or, with ``watch=true``, the stream of its changes."""
    query.labels.update(params.labels)
    if params.watch:
        revision = resources.parse_resource_version(params.resource_version)
        if revision is None:
            raise Invalid("watch needs resource_version: list first, then watch from the list's resource_version")
        events = watch_events(
            ctx.state.feed,
            kind,
            revision,
            query.matches,
            bookmark_interval=params.bookmark_seconds or ctx.state.settings.bookmark_interval,
            timeout=params.timeout_seconds,
        )
        # The first step raises Gone (410) before anything is sent when the version is too old; it then sends
        # a bookmark at once, so that the client knows the watch stands.
        first = await anext(events, None)
        return StreamingResponse(_ndjson(first, events), media_type="application/x-ndjson")
    async with ctx.state.database.read() as session:
        page = await resources.list_page(session, kind, query, page_size=params.page_size, page_token=params.page_token)
    return JSONResponse(
        {
            "items": [resources.render(row) for row in page.rows],
            "resource_version": str(page.resource_version),
            "next_page_token": page.next_page_token,
        }
    )


async def _ndjson(first: dict[str, Any] | None, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    if first is None:
        return
    yield orjson.dumps(first) + b"\n"
    async for event in events:
        yield orjson.dumps(event) + b"\n"


def narrow(query: resources.Query, **filters: str | None) -> None:
    """Add the caller's filters to the part it may see; a filter outside that part selects nothing."""
    for field, value in filters.items():
        if value is None:
            continue
        if getattr(query, field) not in (None, value):
            query.ids = []
        else:
            setattr(query, field, value)
