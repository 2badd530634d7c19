"""Workers that take keys from a work queue and run a reconciler on them, and the one executor that decides,
from how a reconcile ended, when the key is looked at again.

The agent makes one controller per kind it reconciles. The executor (``Controller.execute``) is the only
place that catches a reconciler's exceptions:

- a ``Result``: success; the key's backoff is reset, and it is queued again after ``requeue_after`` if set;
- ``TemporaryError``: logged, queued again after the key's backoff (or the error's ``retry_after``);
- ``PermanentError``: logged; not retried until something adds the key again (the reconciler has reported
  the failure in the resource's status);
- anything else is unknown: logged with its traceback and treated as temporary, so a bug backs off instead of
  spinning, and never kills a worker.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from devyard.runner.errors import ErrorClass, TemporaryError, classify
from devyard.runner.workqueue import QueueShutDown, WorkQueue

__all__ = ["Controller", "ControllerStats", "Reconciler", "Result"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """How a reconcile ended well: ``requeue_after`` seconds until it should look again (None: only when
    something changes)."""

    requeue_after: float | None = None


class Reconciler(Protocol):
    """Brings one resource, named by its key, a step closer to what is wanted; level-based and idempotent."""

    #: The kind it reconciles, for logs: ``Environment``.
    kind: str

    async def reconcile(self, key: str) -> Result: ...


@dataclass
class ControllerStats:
    reconciles: int = 0
    temporary_failures: int = 0
    permanent_failures: int = 0
    unknown_failures: int = 0


class Controller:
    def __init__(self, reconciler: Reconciler, queue: WorkQueue, *, workers: int = 4) -> None:
        if workers < 1:
            raise ValueError("a controller needs at least one worker")
        self.reconciler = reconciler
        self.queue = queue
        self.workers = workers
        self.stats = ControllerStats()

    async def run(self) -> None:
        """Run the workers until the queue is shut down (or this task is cancelled)."""
        async with asyncio.TaskGroup() as group:
            for number in range(self.workers):
                group.create_task(self._work(), name=f"{self.reconciler.kind}-worker-{number}")

    async def _work(self) -> None:
        while True:
            try:
                key = await self.queue.get()
            except QueueShutDown:
                return
            try:
                await self.execute(key)
            finally:
                self.queue.done(key)

    async def execute(self, key: str) -> None:
        """Reconcile ``key`` once and queue it again as its outcome says. Raises nothing but cancellation."""
        kind = self.reconciler.kind
        self.stats.reconciles += 1
        try:
            result = await self.reconciler.reconcile(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = classify(exc)
            if outcome is ErrorClass.PERMANENT:
                self.stats.permanent_failures += 1
                self.queue.forget(key)
                log.error("%s %s failed permanently: %s", kind, key, exc)
                return
            retry_after = exc.retry_after if isinstance(exc, TemporaryError) else None
            delay = self.queue.add_rate_limited(key, at_least=retry_after)
            if outcome is ErrorClass.TEMPORARY:
                self.stats.temporary_failures += 1
                log.warning("%s %s failed, retrying in %.1fs: %s", kind, key, delay, exc)
            else:
                self.stats.unknown_failures += 1
                log.exception("%s %s failed unexpectedly, retrying in %.1fs", kind, key, delay)
            return
        self.queue.forget(key)
        if result.requeue_after is not None:
            self.queue.add_after(key, result.requeue_after)
