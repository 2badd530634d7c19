"""The work queue: collapse, one in flight per key, backoff growth and cap, requeue-after, several workers."""

from __future__ import annotations

import asyncio
import random

import pytest

from devyard.runner.backoff import BackoffPolicy
from devyard.runner.clock import FakeClock
from devyard.runner.controller import Controller, Result
from devyard.runner.errors import PermanentError, TemporaryError
from devyard.runner.workqueue import QueueShutDown, WorkQueue


def make_queue(clock: FakeClock, *, base: float = 1.0, cap: float = 16.0, jitter: float = 0.0) -> WorkQueue:
    return WorkQueue(clock=clock, backoff=BackoffPolicy(base=base, cap=cap, jitter=jitter))


async def drain(queue: WorkQueue) -> list[str]:
    """Every key that is ready now, each marked done."""
    keys = []
    while len(queue):
        key = await queue.get()
        queue.done(key)
        keys.append(key)
    return keys


async def test_duplicates_collapse_while_queued() -> None:
    queue = make_queue(FakeClock())
    for key in ["a", "b", "a", "a", "c", "b"]:
        queue.add(key)
    assert await drain(queue) == ["a", "b", "c"]


async def test_a_key_added_while_processing_waits_for_done() -> None:
    queue = make_queue(FakeClock())
    queue.add("a")
    key = await queue.get()
    queue.add("a")
    queue.add("a")
    assert len(queue) == 0  # not handed to a second worker while the first holds it
    queue.done(key)
    assert await drain(queue) == ["a"]  # and seen once more, after done


async def test_add_after_queues_at_the_due_time_and_the_earliest_wins() -> None:
    clock = FakeClock()
    queue = make_queue(clock)
    queue.add_after("a", 10)
    queue.add_after("a", 5)
    queue.add_after("a", 20)
    queue.add_after("b", 7)
    await clock.advance(4.9)
    assert len(queue) == 0
    await clock.advance(0.1)
    assert await drain(queue) == ["a"]
    await clock.advance(2)
    assert await drain(queue) == ["b"]
    await clock.advance(100)
    assert await drain(queue) == []  # the later adds of "a" collapsed into the earliest
    assert queue.delayed == 0
    await queue.shutdown()


async def test_backoff_grows_exponentially_up_to_the_cap_and_resets_on_forget() -> None:
    queue = make_queue(FakeClock(), base=1.0, cap=16.0)
    delays = [queue.add_rate_limited("a") for _ in range(7)]
    assert delays == [1, 2, 4, 8, 16, 16, 16]
    assert queue.failures("a") == 7
    queue.forget("a")
    assert queue.add_rate_limited("a") == 1
    assert queue.add_rate_limited("b") == 1  # per key
    await queue.shutdown()


async def test_backoff_jitter_stays_within_bounds() -> None:
    policy = BackoffPolicy(base=1.0, cap=30.0, jitter=0.5)
    rng = random.Random(7)
    for failures in range(1, 12):
        ceiling = min(30.0, 2.0 ** (failures - 1))
        for _ in range(50):
            assert ceiling / 2 <= policy.delay(failures, rng) <= ceiling


async def test_rate_limited_key_is_queued_after_its_delay() -> None:
    clock = FakeClock()
    queue = make_queue(clock, base=2.0)
    queue.add_rate_limited("a")
    queue.add_rate_limited("a")  # the second failure: 4 s, but the earlier 2 s entry wins
    await clock.advance(1.9)
    assert len(queue) == 0
    await clock.advance(0.1)
    assert await drain(queue) == ["a"]
    await queue.shutdown()


async def test_shutdown_wakes_waiting_workers_and_refuses_keys() -> None:
    queue = make_queue(FakeClock())
    waiter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    await queue.shutdown()
    with pytest.raises(QueueShutDown):
        await waiter
    queue.add("a")
    queue.add_after("b", 1)
    assert len(queue) == 0
    assert queue.delayed == 0


class Recorder:
    """A reconciler that notes what runs at once, and fails or asks to requeue as scripted."""

    kind = "Thing"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.running: set[str] = set()
        self.most_at_once = 0
        self.overlapped: set[str] = set()
        self.runs: dict[str, int] = {}
        self.script: dict[str, list[Exception | Result]] = {}
        self.gate = asyncio.Event()
        self.gate.set()

    async def reconcile(self, key: str) -> Result:
        if key in self.running:
            self.overlapped.add(key)
        self.running.add(key)
        self.most_at_once = max(self.most_at_once, len(self.running))
        try:
            await self.gate.wait()
            self.runs[key] = self.runs.get(key, 0) + 1
            steps = self.script.get(key)
            step = steps.pop(0) if steps else Result()
            if isinstance(step, Exception):
                raise step
            return step
        finally:
            self.running.discard(key)


async def test_several_workers_run_different_keys_at_once_but_never_one_key_twice() -> None:
    clock = FakeClock()
    queue = make_queue(clock)
    recorder = Recorder(clock)
    recorder.gate.clear()
    controller = Controller(recorder, queue, workers=4)
    running = asyncio.create_task(controller.run())
    for key in ["a", "b", "c", "d", "e", "f"]:
        queue.add(key)
    await clock.advance(0)
    assert recorder.most_at_once == 4
    for _ in range(5):
        queue.add("a")  # while "a" is in flight
    recorder.gate.set()
    await clock.advance(0)
    assert recorder.overlapped == set()
    assert recorder.runs == {"a": 2, "b": 1, "c": 1, "d": 1, "e": 1, "f": 1}
    await queue.shutdown()
    await running


async def test_executor_retries_temporary_and_unknown_errors_with_backoff_and_stops_on_permanent() -> None:
    clock = FakeClock()
    queue = make_queue(clock, base=1.0, cap=4.0)
    recorder = Recorder(clock)
    recorder.script = {
        "temp": [TemporaryError("busy"), TemporaryError("busy"), RuntimeError("bug"), Result()],
        "perm": [PermanentError("no such image")],
        "later": [Result(requeue_after=30), Result()],
    }
    controller = Controller(recorder, queue, workers=2)
    running = asyncio.create_task(controller.run())
    for key in recorder.script:
        queue.add(key)
    await clock.advance(0)
    assert recorder.runs == {"temp": 1, "perm": 1, "later": 1}
    await clock.advance(1)  # first retry after 1 s
    assert recorder.runs["temp"] == 2
    await clock.advance(1.9)  # the second after 2 s more
    assert recorder.runs["temp"] == 2
    await clock.advance(0.1)
    assert recorder.runs["temp"] == 3
    await clock.advance(4)  # the unknown error backs off too (4 s)
    assert recorder.runs["temp"] == 4
    assert queue.failures("temp") == 0  # success reset it
    await clock.advance(30)
    assert recorder.runs == {"temp": 4, "perm": 1, "later": 2}  # permanent: not retried
    assert controller.stats.temporary_failures == 2
    assert controller.stats.unknown_failures == 1
    assert controller.stats.permanent_failures == 1
    await queue.shutdown()
    await running


async def test_temporary_error_retry_after_is_honoured() -> None:
    clock = FakeClock()
    queue = make_queue(clock, base=1.0)
    recorder = Recorder(clock)
    recorder.script = {"a": [TemporaryError("rate limited", retry_after=10)]}
    controller = Controller(recorder, queue, workers=1)
    running = asyncio.create_task(controller.run())
    queue.add("a")
    await clock.advance(9)
    assert recorder.runs == {"a": 1}
    await clock.advance(1)
    assert recorder.runs == {"a": 2}
    await queue.shutdown()
    await running
