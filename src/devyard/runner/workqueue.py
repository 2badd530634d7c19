"""An asyncio work queue keyed by resource id, after client-go's workqueue.

The informer and the agent's resync loop add keys; the controller's workers take them, reconcile, and mark
them done. Guarantees:

- A key is queued at most once: adding a key that is already waiting collapses into the waiting entry.
- A key is handed to one worker at a time. Adding a key while a worker holds it marks it dirty; it is queued
  again when the worker calls ``done``, so the change is seen by a reconcile that starts after it.
- ``add_after`` queues a key later (requeue-after); of several delayed adds of one key, the earliest wins.
- ``add_rate_limited`` queues a key after a per-key jittered exponential backoff, capped; ``forget`` resets
  it (call it after a success).
- After ``shutdown`` nothing is queued and ``get`` raises ``QueueShutDown``.

The queue holds only keys (no per-key tasks or timers): one timer task serves every delayed key.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections import deque
from typing import Any

from devyard.runner.backoff import BackoffPolicy
from devyard.runner.clock import Clock, SystemClock

__all__ = ["QueueShutDown", "WorkQueue"]


class QueueShutDown(Exception):
    """The queue was shut down: the worker that called ``get`` should exit."""


class WorkQueue:
    def __init__(
        self,
        *,
        clock: Clock | None = None,
        backoff: BackoffPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock or SystemClock()
        self._backoff = backoff or BackoffPolicy(base=0.5, cap=60.0)
        self._rng = rng
        self._ready: deque[str] = deque()
        #: Keys that need a reconcile: queued, or held by a worker and added again meanwhile.
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._nonempty = asyncio.Event()
        #: Delayed keys: key -> when it is due; the heap may hold stale entries, the dict is the truth.
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._heap_changed = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._failures: dict[str, int] = {}
        self._shut_down = False

    def __len__(self) -> int:
        """How many keys are queued and ready (not counting delayed ones or those being processed)."""
        return len(self._ready)

    @property
    def processing(self) -> int:
        return len(self._processing)

    @property
    def delayed(self) -> int:
        return len(self._due)

    @property
    def is_shut_down(self) -> bool:
        return self._shut_down

    def is_idle(self) -> bool:
        """Nothing ready and nothing being processed (delayed keys may still be waiting)."""
        return not self._ready and not self._processing

    def add(self, key: str) -> None:
        if self._shut_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # queued again by done()
        self._ready.append(key)
        self._nonempty.set()

    def add_after(self, key: str, delay: float) -> None:
        """Queue ``key`` in ``delay`` seconds (at once when ``delay <= 0``)."""
        if self._shut_down:
            return
        if delay <= 0:
            self.add(key)
            return
        due = self._clock.now() + delay
        current = self._due.get(key)
        if current is not None and current <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._order), key))
        if self._heap[0][2] == key:
            self._heap_changed.set()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._run_timer(), name="workqueue-timer")

    def add_rate_limited(self, key: str, *, at_least: float | None = None) -> float:
        """Queue ``key`` after its backoff (or ``at_least`` seconds, if longer); return the delay."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = self._backoff.delay(failures, self._rng)
        if at_least is not None:
            delay = max(delay, at_least)
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """Reset ``key``'s backoff (a success)."""
        self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        """How many rate-limited adds ``key`` had since it was last forgotten."""
        return self._failures.get(key, 0)

    async def get(self) -> str:
        """The next key; the caller must call ``done(key)`` when it has processed it."""
        while True:
            if self._shut_down:
                raise QueueShutDown
            if self._ready:
                key = self._ready.popleft()
                self._dirty.discard(key)
                self._processing.add(key)
                return key
            self._nonempty.clear()
            await self._nonempty.wait()

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty and not self._shut_down:
            self._ready.append(key)
            self._nonempty.set()

    async def shutdown(self) -> None:
        """Stop handing out keys; workers blocked in ``get`` get ``QueueShutDown``."""
        self._shut_down = True
        self._nonempty.set()
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
        self._ready.clear()
        self._due.clear()
        self._heap.clear()

    async def _run_timer(self) -> None:
        while not self._shut_down:
            now = self._clock.now()
            while self._heap and self._heap[0][0] <= now:
                due, _, key = heapq.heappop(self._heap)
                if self._due.get(key) == due:
                    del self._due[key]
                    self.add(key)
            self._heap_changed.clear()
            changed = asyncio.ensure_future(self._heap_changed.wait())
            waiters: set[asyncio.Future[Any]] = {changed}
            if self._heap:
                waiters.add(asyncio.ensure_future(self._clock.sleep(self._heap[0][0] - now)))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
