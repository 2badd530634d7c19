"""Environment logs on the wire: what a runner ships, and what readers get back.

A runner writes each log stream of an environment (``build``, ``lifecycle``, ``automations/<id>``) to a file and
ships what it appends with ``POST /api/v1/environments/{id}/logs`` (``LogBatch``); the management plane answers
``LogBatchAccepted``. Readers call ``GET /api/v1/environments/{id}/logs`` (``LogPage``) or follow it with
``follow=true``: an NDJSON stream of watch events (``devyard.wire.watch_events``), ``ADDED`` with a ``LogChunk``,
``BOOKMARK`` while nothing arrives, ``DELETED`` when the environment is gone (the last line).

A chunk names its place in the runner's file: ``offset`` counts bytes (of ``data`` encoded as UTF-8) from the
file's start in its ``epoch``, which the runner increments each time the file restarts (was truncated below what
it had shipped). A retried chunk is stored once; a gap between chunks shows as an ``offset`` past the previous
chunk's end. ``data`` is text: the runner replaces bytes that are not UTF-8, and NUL, with ``?`` one for one, so
that byte counts hold.

Called by ``devyard.server.api.logs`` and ``devyard.runner.log_shipper``; the CLI reads the JSON without pydantic.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from pydantic import Field

from devyard.wire.meta import ReadModel, WriteModel

__all__ = [
    "MAX_BATCH_CHUNKS",
    "MAX_CHUNK_BYTES",
    "STREAM_PATTERN",
    "LogBatch",
    "LogBatchAccepted",
    "LogChunk",
    "LogChunkWrite",
    "LogPage",
    "StreamPosition",
]

#: A stream is a relative path of names: ``build``, ``automations/web``; no ``..``, no leading ``/``.
STREAM_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63}){0,3}$"
#: The most text one chunk may carry (characters; the runner sends far less, see ``runner.log_shipper``).
MAX_CHUNK_BYTES: Final = 256 * 1024
MAX_BATCH_CHUNKS: Final = 256


class LogChunkWrite(WriteModel):
    """Bytes ``[offset, offset + len(data.encode()))`` of a stream's file, as the runner read them."""

    stream: str = Field(pattern=STREAM_PATTERN, max_length=200)
    #: How many times the runner's file restarted before these bytes were written.
    epoch: int = Field(default=0, ge=0, le=2**31 - 1)
    offset: int = Field(ge=0, le=2**62)
    data: str = Field(max_length=MAX_CHUNK_BYTES)


class LogBatch(WriteModel):
    """The body of ``POST /api/v1/environments/{id}/logs``: chunks in the order they were written."""

    chunks: list[LogChunkWrite] = Field(max_length=MAX_BATCH_CHUNKS)


class StreamPosition(ReadModel):
    """How far the management plane holds a stream: the runner resumes from here."""

    stream: str
    epoch: int
    #: The byte offset after the last stored chunk.
    end: int


class LogBatchAccepted(ReadModel):
    """The answer to a batch: how many chunks (and bytes) were new, and where each stream of the batch stands."""

    stored: int
    stored_bytes: int
    positions: list[StreamPosition]


class LogChunk(ReadModel):
    """A stored chunk. ``seq`` orders every chunk of an environment as it was received; read after it to go on."""

    seq: int
    stream: str
    epoch: int
    offset: int
    data: str
    received_at: datetime


class LogPage(ReadModel):
    """The answer to ``GET /api/v1/environments/{id}/logs``: chunks after ``after``, oldest first."""

    items: list[LogChunk]
    #: Read (or follow) after this to go on; the given ``after`` when nothing was newer.
    next_after: int
    #: More chunks follow beyond ``limit``.
    more: bool
