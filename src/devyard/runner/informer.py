"""The informer: a local cache of the resources assigned to this runner, kept current by list, then watch.

The agent runs one per kind; reconcilers read it (never the server) for the desired state, so a reconcile
costs no request unless it has something to report. Protocol, per ``docs/api.md``:

1. List every page with the filter (``runner_id=ME``); the list's ``resource_version`` is where to watch from.
   The cache becomes exactly the list; ``on_sync`` gets every key that was or is in it, so the caller can
   reconcile additions, changes and removals alike (and adopt or remove what it finds on the host).
2. Watch from that version: ADDED and MODIFIED replace the cached object, DELETED removes it, BOOKMARK only
   advances the version; every change calls ``on_change(key)``. An object that no longer passes ``owns``
   (reassigned to another runner) counts as deleted.
3. 410 Gone: list again at once. A broken stream, an error, or a watch silent for longer than three bookmark
   intervals: mark the cache unsynced, wait a jittered, capped, growing delay, and list again.

``synced`` is True only between a successful list and the next lost connection. Reconcilers must not remove
anything from the host because it is missing from an unsynced cache: while the server is unreachable the
runner keeps its environments as they are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import pydantic

from devyard.client import ApiError, AsyncClient, TransportError
from devyard.runner.backoff import Backoff, BackoffPolicy
from devyard.runner.clock import Clock, SystemClock
from devyard.wire.meta import Resource, WatchEventType

__all__ = ["Informer"]

log = logging.getLogger(__name__)

ResourceT = TypeVar("ResourceT", bound=Resource[Any, Any])


class _StreamBroken(Exception):
    pass


class Informer(Generic[ResourceT]):
    def __init__(
        self,
        client: AsyncClient,
        path: str,
        model: type[ResourceT],
        *,
        params: Mapping[str, str] | None = None,
        owns: Callable[[ResourceT], bool] | None = None,
        on_change: Callable[[str], None],
        on_sync: Callable[[Iterable[str]], Awaitable[None]] | None = None,
        clock: Clock | None = None,
        reconnect: BackoffPolicy | None = None,
        bookmark_interval: float = 10.0,
        page_size: int = 500,
    ) -> None:
        self._client = client
        self._path = path
        self._model = model
        self._params = dict(params or {})
        self._owns = owns
        self._on_change = on_change
        self._on_sync = on_sync
        self._clock = clock or SystemClock()
        self._backoff = Backoff(reconnect or BackoffPolicy(base=0.5, cap=30.0))
        self._bookmark_interval = bookmark_interval
        self._page_size = page_size
        self._cache: dict[str, ResourceT] = {}
        self._synced = False
        self._synced_event = asyncio.Event()
        self.resource_version: str | None = None
        #: How many times the informer listed; for tests and metrics.
        self.lists = 0
        self._gone_in_a_row = 0

    # What reconcilers use.

    @property
    def synced(self) -> bool:
        """Whether the cache reflects a complete list made since the connection was last lost."""
        return self._synced

    def get(self, key: str) -> ResourceT | None:
        return self._cache.get(key)

    def keys(self) -> list[str]:
        return list(self._cache)

    def __len__(self) -> int:
        return len(self._cache)

    def update(self, item: ResourceT) -> None:
        """Take a newer copy that the runner itself got back from a write; ignored if the key is not cached
        (the watch removed it meanwhile, and the write must not bring it back)."""
        key = item.metadata.id
        if key in self._cache:
            self._cache[key] = item

    def discard(self, key: str) -> None:
        """Forget ``key`` until the server mentions it again (a write found it gone or not ours)."""
        if self._cache.pop(key, None) is not None:
            self._on_change(key)

    async def wait_synced(self) -> None:
        await self._synced_event.wait()

    # The loop.

    async def run(self) -> None:
        """List and watch until cancelled; never returns otherwise."""
        while True:
            try:
                await self._list()
                await self._watch_until_broken()
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.is_gone:
                    # Relist at once, unless the watch right after a list was already too old: then the
                    # server is in trouble, so back off (the cache stays synced: nothing was lost).
                    log.info("%s: watch expired, listing again", self._path)
                    self._gone_in_a_row += 1
                    if self._gone_in_a_row > 1:
                        await self._clock.sleep(self._backoff.next_delay())
                    continue
                self._lose_sync(f"{exc}")
            except (TransportError, _StreamBroken) as exc:
                self._lose_sync(f"{exc}")
            except Exception as exc:
                log.exception("%s: informer failed unexpectedly", self._path)
                self._lose_sync(f"{exc!r}")
            await self._clock.sleep(self._backoff.next_delay())

    def _lose_sync(self, reason: str) -> None:
        if self._synced:
            log.warning("%s: lost the server (%s); keeping everything as it is", self._path, reason)
        else:
            log.info("%s: cannot list or watch yet (%s)", self._path, reason)
        self._synced = False
        self._synced_event.clear()

    async def _list(self) -> None:
        params = {**self._params, "page_size": str(self._page_size)}
        raw, version = await self._client.list_all(self._path, params)
        fresh: dict[str, ResourceT] = {}
        for data in raw:
            item = self._model.model_validate(data)
            if self._owns is None or self._owns(item):
                fresh[item.metadata.id] = item
        touched = set(self._cache) | set(fresh)
        self._cache = fresh
        self.resource_version = version
        self.lists += 1
        if not self._synced:
            log.info("%s: listed %d, watching from %s", self._path, len(fresh), version)
        self._synced = True
        self._synced_event.set()
        self._backoff.reset()
        if self._on_sync is not None:
            await self._on_sync(touched)
        else:
            for key in touched:
                self._on_change(key)

    async def _watch_until_broken(self) -> None:
        """Watch from ``resource_version``, reopening a stream the server ended cleanly."""
        params = {**self._params, "bookmark_seconds": str(self._bookmark_interval)}
        silence = 3 * self._bookmark_interval
        while True:
            assert self.resource_version is not None
            stream = self._client.watch(self._path, self.resource_version, params)
            try:
                while True:
                    try:
                        async with asyncio.timeout(silence):
                            event = await anext(stream)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise _StreamBroken(f"no event or bookmark for {silence:.0f}s") from None
                    self._apply(event.type, event.object)
            finally:
                await _close(stream)

    def _apply(self, kind: WatchEventType, data: dict[str, Any]) -> None:
        if kind is WatchEventType.BOOKMARK:
            self._gone_in_a_row = 0
            version = data.get("metadata", {}).get("resource_version")
            if version:
                self.resource_version = str(version)
            return
        try:
            item = self._model.model_validate(data)
        except pydantic.ValidationError as exc:
            raise _StreamBroken(f"cannot read a {kind} event: {exc}") from exc
        self._gone_in_a_row = 0
        key = item.metadata.id
        if kind is WatchEventType.DELETED or (self._owns is not None and not self._owns(item)):
            self._cache.pop(key, None)
        else:
            cached = self._cache.get(key)
            self._cache[key] = item
            if cached is not None and cached.metadata.resource_version == item.metadata.resource_version:
                # The echo of a write of ours, already in the cache (``update``): nothing new to reconcile, and
                # reconciling it would undo a retry's backoff.
                self.resource_version = item.metadata.resource_version
                return
        self.resource_version = item.metadata.resource_version
        self._on_change(key)


async def _close(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
