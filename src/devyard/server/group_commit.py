"""Group commit: the staged writes of many requests in one transaction.

A request checks its input and builds its rows in a read session of its own, concurrently with the others,
then hands a ``stage`` function to ``GroupCommit.submit``. One task takes whatever is waiting (up to
``max_batch``), stages every job onto one transaction and commits it: one revision bump, one insert per table,
one commit, instead of one of each per request. When the batch fails (a name taken by one of its jobs), each
job runs again alone, so only the guilty one gets the error.

Used by ``api.environments`` for creates, the write that comes in bursts. A stage function only stages (it
must not read: it runs inside the shared transaction, one job after the other).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from devyard.server.state import ServerState
from devyard.server.store import resources
from devyard.server.store.errors import StoreError

__all__ = ["GroupCommit"]

log = logging.getLogger(__name__)

Stage = Callable[[resources.Tx], None]


@dataclass
class _Job:
    actor: resources.Actor
    stage: Stage
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    def __init__(self, state: ServerState, *, max_batch: int = 64) -> None:
        self.state = state
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        #: How many transactions committed how many jobs (for tests and the curious).
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.done.done():
                job.done.set_exception(StoreError("the server is shutting down; try again"))

    async def submit(self, actor: resources.Actor, stage: Stage) -> None:
        """Stage and commit; returns when committed, raises what the commit raised for this job."""
        job = _Job(actor, stage)
        await self._queue.put(job)
        await job.done

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            except Exception as exc:
                if len(batch) == 1:
                    self._finish(batch, exc)
                    continue
                log.debug("a batch of %d failed (%s); committing its jobs one by one", len(batch), exc)
                for job in batch:
                    try:
                        await self._commit([job])
                    except Exception as alone:
                        self._finish([job], alone)
                    else:
                        self._finish([job], None)
            else:
                self._finish(batch, None)

    async def _commit(self, batch: list[_Job]) -> None:
        async with self.state.database.write() as session:
            combined = resources.Tx(session)
            for job in batch:
                tx = resources.Tx(session, job.actor)
                job.stage(tx)
                combined.absorb(tx)
            await combined.commit()
        self.batches += 1
        self.jobs += len(batch)
        self.state.feed.wake()
        self.state.schedule_soon.set()

    @staticmethod
    def _finish(batch: list[_Job], error: Exception | None) -> None:
        for job in batch:
            if job.done.done():
                continue
            if error is None:
                job.done.set_result(None)
            else:
                job.done.set_exception(error)
