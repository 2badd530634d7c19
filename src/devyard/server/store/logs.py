"""Environment logs in the database: storing what a runner ships, once, and reading it back in order.

Called by ``api.logs`` with a session it opened (``append`` in a write transaction, ``read`` in a read one).
Authorization is the caller's (``policy``); these functions trust it.

- ``append`` stores each chunk at most once: per stream it keeps the last stored ``(epoch, end)``, skips what is
  already there (a retried batch), trims the overlap of a chunk that starts inside it, and stores a chunk past
  the end (a gap) or of a newer epoch (a restarted file) as it comes. Then it drops the stream's chunks that do not
  lie wholly within its newest ``retained_bytes``.
- Writers to one environment are serialized (on PostgreSQL by an advisory lock; SQLite has one writer), so
  ``seq`` grows in commit order within an environment: a reader that has seen ``seq`` N never misses a chunk
  below N that commits later. Across environments no order is promised, and none is needed.
- On PostgreSQL a commit that stored something sends ``NOTIFY devyard_logs, '<environment id>'``, which wakes
  the followers of every server process (``api.logs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from devyard.server.database.tables import EnvironmentLogRow, ResourceRow
from devyard.server.store import resources

__all__ = [
    "NOTIFY_CHANNEL",
    "RETAINED_BYTES",
    "AppendResult",
    "Chunk",
    "Position",
    "append",
    "environment_exists",
    "read",
]

#: What is kept of each stream of an environment: the newest bytes, older chunks pruned.
RETAINED_BYTES: Final = 4 * 1024 * 1024
NOTIFY_CHANNEL: Final = "devyard_logs"


@dataclass(frozen=True)
class Chunk:
    """A chunk as the runner sent it (``offset`` in bytes of ``data`` encoded as UTF-8)."""

    stream: str
    epoch: int
    offset: int
    data: str


@dataclass(frozen=True)
class Position:
    stream: str
    epoch: int
    end: int
    #: The stream's running total of stored bytes (``EnvironmentLogRow.retained``) at its newest chunk.
    retained: int


@dataclass(frozen=True)
class AppendResult:
    stored: int
    stored_bytes: int
    positions: tuple[Position, ...]


async def append(
    session: AsyncSession,
    environment_id: str,
    chunks: Sequence[Chunk],
    *,
    retained_bytes: int = RETAINED_BYTES,
) -> AppendResult:
    """Store the chunks that are new, in order; prune each touched stream to ``retained_bytes``."""
    is_postgresql = session.get_bind().dialect.name == "postgresql"
    if is_postgresql:
        await session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"devyard-logs:{environment_id}"}
        )
    positions: dict[str, Position | None] = {}
    now = resources.utcnow()
    stored = stored_bytes = 0
    for chunk in chunks:
        if chunk.stream not in positions:
            positions[chunk.stream] = await _position(session, environment_id, chunk.stream)
        last = positions[chunk.stream]
        encoded = chunk.data.encode()
        offset, size, data = chunk.offset, len(encoded), chunk.data
        if size == 0:
            continue
        if last is not None and chunk.epoch < last.epoch:
            continue  # from before a restart the server already has
        if last is not None and chunk.epoch == last.epoch and offset < last.end:
            if offset + size <= last.end:
                continue  # stored already: a retried batch
            # A resend that reaches further: keep only what is new. The runner cuts at characters, so the
            # cut at the old end falls between characters too; if not, the broken one becomes U+FFFD.
            data = encoded[last.end - offset :].decode(errors="replace")
            size -= last.end - offset
            offset = last.end
        retained = (last.retained if last is not None else 0) + size
        session.add(
            EnvironmentLogRow(
                environment_id=environment_id,
                stream=chunk.stream,
                epoch=chunk.epoch,
                byte_offset=offset,
                size=size,
                retained=retained,
                data=data,
                received_at=now,
            )
        )
        positions[chunk.stream] = Position(chunk.stream, chunk.epoch, offset + size, retained)
        stored += 1
        stored_bytes += size
    if stored:
        await session.flush()
        for position in positions.values():
            if position is not None and position.retained > retained_bytes:
                await session.execute(
                    delete(EnvironmentLogRow).where(
                        EnvironmentLogRow.environment_id == environment_id,
                        EnvironmentLogRow.stream == position.stream,
                        # A chunk that begins outside the newest ``retained_bytes`` goes whole.
                        EnvironmentLogRow.retained - EnvironmentLogRow.size < position.retained - retained_bytes,
                    )
                )
        if is_postgresql:
            await session.execute(
                text("SELECT pg_notify(:channel, :id)"), {"channel": NOTIFY_CHANNEL, "id": environment_id}
            )
    return AppendResult(stored, stored_bytes, tuple(p for p in positions.values() if p is not None))


async def _position(session: AsyncSession, environment_id: str, stream: str) -> Position | None:
    row = (
        await session.execute(
            select(
                EnvironmentLogRow.epoch,
                EnvironmentLogRow.byte_offset,
                EnvironmentLogRow.size,
                EnvironmentLogRow.retained,
            )
            .where(EnvironmentLogRow.environment_id == environment_id, EnvironmentLogRow.stream == stream)
            .order_by(EnvironmentLogRow.seq.desc())
            .limit(1)
        )
    ).one_or_none()
    if row is None:
        return None
    return Position(stream, row.epoch, row.byte_offset + row.size, row.retained)


async def read(
    session: AsyncSession, environment_id: str, *, after: int, limit: int, stream: str | None = None
) -> list[EnvironmentLogRow]:
    """The environment's chunks with ``seq`` above ``after``, oldest first, at most ``limit``. ``stream`` selects
    one stream, or with a trailing ``/`` every stream under it (``automations/``)."""
    statement = select(EnvironmentLogRow).where(
        EnvironmentLogRow.environment_id == environment_id, EnvironmentLogRow.seq > after
    )
    if stream is not None and stream.endswith("/"):
        statement = statement.where(EnvironmentLogRow.stream.startswith(stream, autoescape=True))
    elif stream is not None:
        statement = statement.where(EnvironmentLogRow.stream == stream)
    statement = statement.order_by(EnvironmentLogRow.seq).limit(limit)
    return list((await session.scalars(statement)).all())


async def environment_exists(session: AsyncSession, environment_id: str) -> bool:
    found = await session.scalar(
        select(ResourceRow.id).where(ResourceRow.kind == "Environment", ResourceRow.id == environment_id)
    )
    return found is not None
