"""The load generator's two phases against a running server, each bounded in requests and in time.

``create_environments``: N creates through ``POST /api/v1/environments``, ``concurrency`` in flight over
keep-alive connections, while a watch opened before the first create notes when each environment first
shows ``status.phase == running``; create-to-Running runs from the moment its POST was sent.

``fixed_rate``: an open-loop mix (half ``GET`` of one environment, a quarter lists of a page, a quarter label
``PATCH``es) at a fixed rate. Request i is due at ``start + i / rate`` and is sent then whether or not the
earlier ones have been answered; its latency runs from when it was due, not from when it was sent, so a
server (or generator) that falls behind shows up in the figures instead of thinning the load
(coordinated omission). At most ``connections`` requests are on the wire at once, over keep-alive
connections; the rest wait their turn in a first-come queue, and that wait counts in their latency, as the
wait in a server's accept queue would. (Letting thousands of requests queue inside httpx's connection pool
instead costs the generator time quadratic in the queue's length, and its own lag then passes for the
server's.) The first ``warmup`` seconds are sent but not measured.

Both phases spread their connections over several clients of at most ``_PER_CLIENT`` connections: httpx's
pool checks every connection it holds (a ``poll`` system call each) for every request, so one pool of 64
connections cost the generator more CPU per request than the server spent answering it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from devyard.client import ApiError, AsyncClient, RetryPolicy, TransportError

__all__ = [
    "FIXED_RATE_CONNECTIONS",
    "LIST_PAGE_SIZE",
    "OPERATIONS",
    "CreateResult",
    "RateResult",
    "create_environments",
    "fixed_rate",
]

_PATH = "/api/v1/environments"
#: Every request is sent once: a retry would hide the failure it retried.
_ONCE = RetryPolicy(attempts=1)
#: The fixed-rate mix: operation and weight.
OPERATIONS: dict[str, float] = {"get": 0.5, "list": 0.25, "patch": 0.25}
LIST_PAGE_SIZE = 50
FIXED_RATE_CONNECTIONS = 64
_PER_CLIENT = 8
_WATCH_ATTEMPTS = 5


@dataclass
class CreateResult:
    requested: int
    #: Seconds from the first POST sent to the last answered.
    seconds: float = 0.0
    #: Per answered POST, seconds from sent to answered.
    create_latencies: list[float] = field(default_factory=list)
    #: Per environment seen running, seconds from its POST sent to the watch event.
    to_running: list[float] = field(default_factory=list)
    #: Per environment seen assigned to a runner, seconds from its POST sent to the watch event.
    to_scheduled: list[float] = field(default_factory=list)
    #: Created, but not seen running before the deadline.
    not_running: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    environment_ids: list[str] = field(default_factory=list)

    @property
    def created(self) -> int:
        return len(self.environment_ids)

    @property
    def throughput(self) -> float:
        return self.created / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RateResult:
    rate: float
    duration: float
    #: Requests due in the measured window.
    measured: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in OPERATIONS})
    errors: Counter[str] = field(default_factory=Counter)
    #: How far behind its schedule the generator itself sent a request, at worst (its own CPU starved).
    worst_send_lag: float = 0.0

    @property
    def all_latencies(self) -> list[float]:
        return [value for values in self.latencies.values() for value in values]


@asynccontextmanager
async def _clients(url: str, token: str, connections: int, timeout: float) -> AsyncIterator[list[AsyncClient]]:
    """Enough clients of at most ``_PER_CLIENT`` connections each for ``connections`` in all."""
    async with AsyncExitStack() as stack:
        count = max(1, -(-connections // _PER_CLIENT))
        yield [
            await stack.enter_async_context(
                AsyncClient(url, token, retry=_ONCE, timeout=timeout, max_connections=_PER_CLIENT)
            )
            for _ in range(count)
        ]


async def create_environments(
    url: str, token: str, *, count: int, concurrency: int, running_timeout: float, request_timeout: float = 30.0
) -> CreateResult:
    result = CreateResult(count)
    sent_at: dict[str, float] = {}
    running_at: dict[str, float] = {}
    scheduled_at: dict[str, float] = {}
    waiting: set[str] | None = None  # set once every create has been answered
    all_running = asyncio.Event()

    async with (
        _clients(url, token, concurrency, request_timeout) as clients,
        AsyncClient(url, token, retry=_ONCE, timeout=request_timeout, max_connections=2) as watcher,
    ):
        version = str((await watcher.get(_PATH, {"page_size": 1}))["resource_version"])

        async def watch() -> None:
            nonlocal version
            for _ in range(_WATCH_ATTEMPTS):
                try:
                    async for event in watcher.watch(_PATH, version, {"bookmark_seconds": 1}):
                        data = event.object
                        version = str(data.get("metadata", {}).get("resource_version", version))
                        if event.type not in ("ADDED", "MODIFIED"):
                            continue
                        key, status = data["metadata"]["id"], data["status"]
                        if status.get("runner_id"):
                            scheduled_at.setdefault(key, time.perf_counter())
                        if status["phase"] == "running":
                            running_at.setdefault(key, time.perf_counter())
                            if waiting is not None:
                                waiting.discard(key)
                                if not waiting:
                                    all_running.set()
                except (ApiError, TransportError) as exc:
                    result.errors[f"watch: {exc}"[:80]] += 1

        numbers = iter(range(count))

        async def create(client: AsyncClient) -> None:
            for number in numbers:  # one iterator shared by the workers: each number is taken once
                body = {"metadata": {"name": f"bench-{number:05d}", "labels": {"bench": "api"}}}
                started = time.perf_counter()
                try:
                    created = await client.post(_PATH, body)
                except ApiError as exc:
                    result.errors[f"create: {exc.status} {exc.code}"] += 1
                    continue
                except TransportError as exc:
                    result.errors[f"create: {type(exc.__cause__).__name__}"] += 1
                    continue
                result.create_latencies.append(time.perf_counter() - started)
                key = created["metadata"]["id"]
                sent_at[key] = started
                result.environment_ids.append(key)

        watching = asyncio.create_task(watch(), name="bench-watch")
        try:
            await asyncio.sleep(0.2)  # let the watch open before the first create
            first = time.perf_counter()
            workers = [
                asyncio.create_task(create(clients[worker % len(clients)])) for worker in range(min(concurrency, count))
            ]
            # Each request times out, so the workers end; the bound is a backstop.
            _, late = await asyncio.wait(workers, timeout=request_timeout * (count // max(concurrency, 1) + 2))
            for task in late:
                task.cancel()
            result.seconds = time.perf_counter() - first
            waiting = set(sent_at) - set(running_at)
            if not waiting:
                all_running.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_running.wait(), running_timeout)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
    result.to_running = [running_at[key] - sent_at[key] for key in sent_at if key in running_at]
    result.to_scheduled = [scheduled_at[key] - sent_at[key] for key in sent_at if key in scheduled_at]
    result.not_running = len(sent_at) - len(result.to_running)
    return result


async def fixed_rate(
    url: str,
    token: str,
    environment_ids: list[str],
    *,
    rate: float,
    duration: float,
    warmup: float,
    connections: int = FIXED_RATE_CONNECTIONS,
    request_timeout: float = 10.0,
    seed: int = 20261125,
) -> RateResult:
    result = RateResult(rate, duration)
    if not environment_ids:
        result.errors["no environments to read"] += 1
        return result
    chooser = random.Random(seed)
    names, weights = list(OPERATIONS), list(OPERATIONS.values())
    total = max(1, round(rate * (warmup + duration)))

    async with _clients(url, token, connections, request_timeout) as clients:
        # One first-come queue per client, so that no client's pool ever queues requests itself.
        slots = [asyncio.Semaphore(_PER_CLIENT) for _ in clients]
        start = time.perf_counter() + 0.05
        measured_from = start + warmup

        async def send(number: int, due: float, operation: str, key: str) -> None:
            client, on_the_wire = clients[number % len(clients)], slots[number % len(clients)]
            request: Any
            if operation == "get":
                request = client.get(f"{_PATH}/{key}")
            elif operation == "list":
                request = client.get(_PATH, {"page_size": LIST_PAGE_SIZE})
            else:
                request = client.patch(f"{_PATH}/{key}", {"metadata": {"labels": {"bench": "api", "n": str(number)}}})
            try:
                async with on_the_wire:
                    await request
            except ApiError as exc:
                if due >= measured_from:
                    result.errors[f"{operation}: {exc.status} {exc.code}"] += 1
                return
            except TransportError as exc:
                if due >= measured_from:
                    result.errors[f"{operation}: {type(exc.__cause__).__name__}"] += 1
                return
            if due >= measured_from:
                result.latencies[operation].append(time.perf_counter() - due)

        tasks: list[asyncio.Task[None]] = []
        for number in range(total):
            due = start + number / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                result.worst_send_lag = max(result.worst_send_lag, -delay)
            if due >= measured_from:
                result.measured += 1
            operation = chooser.choices(names, weights)[0]
            key = chooser.choice(environment_ids)
            tasks.append(asyncio.create_task(send(number, due, operation, key)))
        # Queued requests wait for their turn and then up to request_timeout each: bound the wait for them all.
        backlog = len(tasks) / (len(clients) * _PER_CLIENT) * request_timeout
        _, late = await asyncio.wait(tasks, timeout=min(request_timeout + backlog, 300.0))
        for task in late:
            task.cancel()
        if late:
            result.errors["unanswered at the end"] += len(late)
    return result
