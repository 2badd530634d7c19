"""One line of a watch stream (``application/x-ndjson``): its type and the object it carries.

Kept free of pydantic because the ``devyard`` command reads watch streams (``env create --wait``) and must start
fast: importing pydantic and the wire models costs it about a tenth of a second. ``devyard.wire.meta`` re-exports
both names. ``devyard.client`` parses each line with ``WatchEvent.from_json``; the server writes the lines as
plain JSON (``devyard.server.watch``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["WatchEvent", "WatchEventType"]


class WatchEventType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    #: No change, only a newer resource_version to resume from (``object.metadata.resource_version``).
    BOOKMARK = "BOOKMARK"
    #: The watch ended with an error (``object`` is an ErrorEnvelope); 410 means relist.
    ERROR = "ERROR"


_TYPES = frozenset(WatchEventType)


@dataclass(frozen=True)
class WatchEvent:
    """One line of a watch stream: ``{"type": ..., "object": {...}}``; ``object`` is the resource's JSON (or the
    error envelope of an ``ERROR``), not validated here: the reader validates what it uses."""

    type: WatchEventType
    object: dict[str, Any]

    @classmethod
    def from_json(cls, data: Any) -> WatchEvent:
        """The event that decoded JSON ``data`` is; ``ValueError`` saying what is wrong if it is none.
        Unknown fields beside ``type`` and ``object`` are ignored, as the read schemas do."""
        if not isinstance(data, dict):
            raise ValueError(f"a watch event is a JSON object, not {type(data).__name__}")
        name = data.get("type")
        if not isinstance(name, str) or name not in _TYPES:
            raise ValueError(f"unknown watch event type {name!r}")
        kind = WatchEventType(name)
        carried = data.get("object")
        if not isinstance(carried, dict):
            raise ValueError(f"a {kind} watch event's object must be a JSON object, not {type(carried).__name__}")
        return cls(kind, carried)
