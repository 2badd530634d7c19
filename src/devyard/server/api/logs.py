"""``/api/v1/environments/{id}/logs``: the owning runner ships an environment's logs; its readers read and follow them.

- ``POST``: the runner the environment is assigned to, only it, sends a ``LogBatch``. Not audited one by one
  (no person made these writes); their volume is held down by the body limit of the app, the batch limits of
  ``wire.logs`` and a byte budget per runner (``RunnerBudget``): a runner over it gets 429 with Retry-After.
- ``GET``: whoever may read the environment (its owner, the admins of its organization, the runner it is on)
  reads a page of chunks after ``after``; with ``follow=true`` an NDJSON stream of watch events (``ADDED`` with
  a chunk, ``BOOKMARK`` while quiet, ``DELETED`` when the environment is gone, then the stream ends).

Followers wait on a ``LogBell`` of the server process, rung by this process's log writes, by every change of the
change feed (a deletion among them) and, on PostgreSQL, by ``NOTIFY devyard_logs`` from other processes (one
LISTEN connection while anyone follows); they also look every ``poll_interval`` as a backstop. Registered by
``server.app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError

from devyard.server import policy, watch
from devyard.server.api.context import Context, context, error_response
from devyard.server.api.responses import ERRORS, JSONResponse
from devyard.server.database.engine import Database
from devyard.server.database.tables import EnvironmentLogRow
from devyard.server.state import ServerState
from devyard.server.store import environments, logs
from devyard.server.store.errors import Conflict, NotFound
from devyard.wire.logs import STREAM_PATTERN, LogBatch, LogBatchAccepted, LogPage

__all__ = ["LogBell", "RunnerBudget", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/environments", tags=["logs"], responses=ERRORS)

#: A runner's sustained allowance of log bytes per second, per server process, and how much it may burst.
RUNNER_BYTES_PER_SECOND: Final = 2 * 1024 * 1024
RUNNER_BURST_BYTES: Final = 16 * 1024 * 1024
#: What a request costs at least, so that a flood of tiny batches is held too.
REQUEST_COST_BYTES: Final = 4 * 1024
#: Followers look for new chunks this often even when nothing woke them.
FOLLOW_POLL_INTERVAL: Final = 1.0
_PAGE_LIMIT: Final = 1000


@dataclass
class RunnerBudget:
    """A token bucket of bytes per runner: ``rate`` per second, at most ``burst`` saved up."""

    rate: float = RUNNER_BYTES_PER_SECOND
    burst: float = RUNNER_BURST_BYTES
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def take(self, runner_id: str, cost: int) -> float:
        """Spend ``cost`` and return 0, or return the seconds until the runner can afford it (nothing spent)."""
        now = self.clock()
        tokens, then = self._buckets.get(runner_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        cost = min(cost, int(self.burst))
        if tokens < cost:
            self._buckets[runner_id] = (tokens, now)
            return (cost - tokens) / self.rate
        self._buckets[runner_id] = (tokens - cost, now)
        return 0.0


class LogBell:
    """Wakes the followers of an environment's logs in one server process."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._events: dict[str, asyncio.Event] = {}
        self._followers = 0
        self._listener: asyncio.Task[None] | None = None

    def event(self, environment_id: str) -> asyncio.Event:
        """The event the next ring for the environment sets: take it before reading, then wait on it."""
        return self._events.setdefault(environment_id, asyncio.Event())

    def ring(self, environment_id: str) -> None:
        event = self._events.pop(environment_id, None)
        if event is not None:
            event.set()

    def ring_all(self) -> None:
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[None]:
        """Held by each follower: on PostgreSQL, LISTEN for other processes' log writes while anyone follows."""
        self._followers += 1
        if self._listener is None and not self.database.is_sqlite:
            self._listener = asyncio.create_task(self._listen(), name="log-listener")
        try:
            yield
        finally:
            self._followers -= 1
            if self._followers == 0 and self._listener is not None:
                listener, self._listener = self._listener, None
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def _listen(self) -> None:
        await watch.listen_forever(self.database, logs.NOTIFY_CHANNEL, self.ring, "log followers")


@dataclass
class _Intake:
    state: ServerState
    budget: RunnerBudget
    bell: LogBell


def _intake(request: Request) -> _Intake:
    """This process's budget and bell, made on first use for the app's current state."""
    state: ServerState = request.app.state.devyard
    intake: _Intake | None = getattr(request.app.state, "devyard_logs", None)
    if intake is None or intake.state is not state:
        intake = _Intake(state, RunnerBudget(), LogBell(state.database))
        state.feed.subscribe(intake.bell.ring_all)
        request.app.state.devyard_logs = intake
    return intake


@router.post("/{environment_id}/logs", response_model=LogBatchAccepted)
async def append_logs(
    environment_id: str, body: LogBatch, ctx: Context = Depends(context), intake: _Intake = Depends(_intake)
) -> Any:
    """Store a batch of the environment's log chunks; for the runner the environment is assigned to."""
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, "Environment", environment_id)
    environments.require_owning_runner(ctx.principal, row)
    cost = max(REQUEST_COST_BYTES, sum(len(chunk.data) for chunk in body.chunks))
    wait = intake.budget.take(ctx.principal.id, cost)
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        return error_response(
            429,
            "too_many_requests",
            f"runner {ctx.principal.name} sends logs faster than {RUNNER_BYTES_PER_SECOND} bytes a second: "
            f"send again in {seconds}s",
            {"retry_after": seconds},
            {"Retry-After": str(seconds)},
        )
    chunks = [logs.Chunk(c.stream, c.epoch, c.offset, c.data) for c in body.chunks]
    try:
        async with ctx.state.database.write() as session:
            result = await logs.append(session, environment_id, chunks)
    except IntegrityError as exc:
        # The environment went meanwhile (its row, and with it the foreign key), or, without the advisory lock's
        # order, a duplicate raced in: either way the runner may ask again and learn which.
        async with ctx.state.database.read() as session:
            if not await logs.environment_exists(session, environment_id):
                raise NotFound(f"Environment {environment_id} not found") from exc
        raise Conflict("another batch of this environment's logs was stored at the same time: send again") from exc
    if result.stored:
        intake.bell.ring(environment_id)
    return JSONResponse(
        {
            "stored": result.stored,
            "stored_bytes": result.stored_bytes,
            "positions": [{"stream": p.stream, "epoch": p.epoch, "end": p.end} for p in result.positions],
        }
    )


@router.get("/{environment_id}/logs", response_model=LogPage)
async def read_logs(
    environment_id: str,
    stream: str | None = Query(
        None,
        max_length=201,
        pattern=STREAM_PATTERN.removesuffix("$") + "/?$",
        description="One stream (build), or every stream under a prefix ending in / (automations/)",
    ),
    after: int = Query(0, ge=0, description="Only chunks whose seq is above this"),
    limit: int = Query(_PAGE_LIMIT, ge=1, le=5000),
    follow: bool = Query(False, description="Stream new chunks as NDJSON watch events until the environment goes"),
    bookmark_seconds: float | None = Query(None, gt=0, le=3600),
    timeout_seconds: float | None = Query(None, gt=0, le=86400),
    ctx: Context = Depends(context),
    intake: _Intake = Depends(_intake),
) -> Any:
    """The environment's log chunks after ``after``, oldest first; or, with ``follow=true``, a stream of them."""
    async with ctx.state.database.read() as session:
        await policy.visible(session, ctx.principal, "Environment", environment_id)
        if not follow:
            rows = await logs.read(session, environment_id, after=after, limit=limit + 1, stream=stream)
    if follow:
        bookmark = bookmark_seconds or ctx.state.settings.bookmark_interval
        events = _follow(intake, environment_id, stream, after, bookmark=bookmark, timeout=timeout_seconds)
        return StreamingResponse(_ndjson(events), media_type="application/x-ndjson")
    more = len(rows) > limit
    rows = rows[:limit]
    return JSONResponse(
        {"items": [_chunk(row) for row in rows], "next_after": rows[-1].seq if rows else after, "more": more}
    )


def _chunk(row: EnvironmentLogRow) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "stream": row.stream,
        "epoch": row.epoch,
        "offset": row.byte_offset,
        "data": row.data,
        "received_at": row.received_at.isoformat(),
    }


async def _follow(
    intake: _Intake, environment_id: str, stream: str | None, after: int, *, bookmark: float, timeout: float | None
) -> AsyncIterator[dict[str, Any]]:
    database, bell = intake.state.database, intake.bell
    cursor = after
    deadline = time.monotonic() + timeout if timeout is not None else None
    last_sent = 0.0  # a bookmark goes out at once: the client knows the stream stands
    async with bell.following():
        while True:
            woken = bell.event(environment_id)
            async with database.read() as session:
                rows = await logs.read(session, environment_id, after=cursor, limit=_PAGE_LIMIT, stream=stream)
                # Chunks go with their environment: none read and no environment means it is gone.
                gone = not rows and not await logs.environment_exists(session, environment_id)
            for row in rows:
                yield {"type": "ADDED", "object": _chunk(row)}
                cursor = row.seq
            now = time.monotonic()
            if rows:
                last_sent = now
            if gone:
                yield {"type": "DELETED", "object": {"kind": "Environment", "metadata": {"id": environment_id}}}
                return
            if len(rows) == _PAGE_LIMIT:
                continue
            if now - last_sent >= bookmark:
                yield {"type": "BOOKMARK", "object": {"kind": "EnvironmentLog", "next_after": cursor}}
                last_sent = now
            if deadline is not None and now >= deadline:
                return
            wait = min(FOLLOW_POLL_INTERVAL, bookmark - (now - last_sent))
            if deadline is not None:
                wait = min(wait, deadline - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), max(wait, 0.01))


async def _ndjson(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for event in events:
        yield orjson.dumps(event) + b"\n"
