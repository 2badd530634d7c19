"""Sync and async clients with one retry policy and one error mapping.

``Client`` (the CLI's, so it must start fast) speaks through ``_connections`` on the standard library unless it is
given an httpx transport or a proxy is configured; ``AsyncClient`` speaks through httpx. Neither httpx nor the
pydantic wire models are imported until they are needed: a watch yields ``WatchEvent``s, plain dataclasses.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from devyard.client import _connections
from devyard.client._errors import ApiError, TransportError
from devyard.wire.watch_events import WatchEvent

if TYPE_CHECKING:
    import httpx

__all__ = ["AsyncClient", "Client", "RetryPolicy"]

_RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
_ALWAYS_RETRY_STATUSES = frozenset({429, 503})  # the server promises it did nothing
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})

Params = Mapping[str, Any] | None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_delay * 6)
            except ValueError:
                pass
        # Imported here: the CLI's requests mostly succeed at once, and random (with hashlib's SHA-512) is a
        # millisecond of every command's start.
        import random

        ceiling = min(self.max_delay, self.base_delay * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)


NO_RETRY = RetryPolicy(attempts=1)


def _error_from(status: int, reason: str, content: bytes) -> ApiError:
    try:
        error = json.loads(content)["error"]
        return ApiError(status, str(error["code"]), str(error["message"]), error.get("details"))
    except (ValueError, KeyError, TypeError):
        text = content.decode("utf-8", errors="replace")[:500]
        return ApiError(status, "http_error", text or reason)


def _should_retry(method: str, status: int | None, connect_error: bool) -> bool:
    if connect_error:
        return True
    if status is None:
        return method in _IDEMPOTENT
    if status in _ALWAYS_RETRY_STATUSES:
        return True
    return status in _RETRY_STATUSES and method in _IDEMPOTENT


def _clean(params: Params) -> dict[str, Any] | None:
    if params is None:
        return None
    return {key: value for key, value in params.items() if value is not None}


def _parse_line(line: str) -> WatchEvent | None:
    if not line.strip():
        return None
    try:
        event = WatchEvent.from_json(json.loads(line))
    except ValueError as exc:  # json's errors are ValueErrors too
        # The stream is broken like a cut connection would break it: the watcher lists again or retries.
        raise TransportError(f"the watch stream has an unreadable line ({exc}): {line[:200]!r}") from None
    if event.type == "ERROR":
        error = event.object.get("error", {})
        code = str(error.get("code", "error"))
        raise ApiError(410 if code == "gone" else 500, code, str(error.get("message", "")), error.get("details"))
    return event


class _Connections(Protocol):
    """What ``Client`` sends its requests through: ``_connections.ConnectionPool`` or ``_HttpxConnections``."""

    def request(self, method: str, path: str, *, body: Any = None, params: Params = None) -> _connections.Reply: ...

    def stream(
        self, path: str, params: Params, *, read_timeout: float | None
    ) -> AbstractContextManager[_connections.Stream | _HttpxStream]: ...

    def close(self) -> None: ...


class _HttpxStream:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.reason = response.reason_phrase

    def read(self) -> bytes:
        return self._response.read()

    def lines(self) -> Iterator[str]:
        return self._response.iter_lines()


class _HttpxConnections:
    """``Client`` over httpx: with a caller's transport, or when a proxy variable is set (httpx honours it)."""

    def __init__(
        self, server: str, headers: Mapping[str, str], *, timeout: float, transport: httpx.BaseTransport | None
    ) -> None:
        import httpx

        self._httpx = httpx
        self._http = httpx.Client(base_url=server, headers=headers, timeout=timeout, transport=transport)

    def request(self, method: str, path: str, *, body: Any = None, params: Params = None) -> _connections.Reply:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except self._httpx.TransportError as exc:
            connect = isinstance(exc, self._httpx.ConnectError | self._httpx.ConnectTimeout)
            raise _connections.NoAnswer(str(exc), connect=connect) from exc
        retry_after = response.headers.get("Retry-After")
        return _connections.Reply(response.status_code, response.reason_phrase, retry_after, response.content)

    @contextmanager
    def stream(self, path: str, params: Params, *, read_timeout: float | None) -> Iterator[_HttpxStream]:
        timeout = self._httpx.Timeout(30.0, read=read_timeout)
        try:
            with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                yield _HttpxStream(response)
        except self._httpx.TransportError as exc:
            raise _connections.NoAnswer(str(exc), connect=False) from exc

    def close(self) -> None:
        self._http.close()


class Client:
    """A blocking client, for the CLI and scripts; safe to share between threads."""

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"User-Agent": "devyard-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.server = server.rstrip("/")
        self.retry = retry
        self._http: _Connections
        if transport is None and not _connections.proxy_configured():
            self._http = _connections.ConnectionPool(self.server, headers, timeout=timeout)
        else:
            self._http = _HttpxConnections(self.server, headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, json: Any = None, params: Params = None) -> Any:
        """Send a request and return its decoded JSON body (None for an empty body)."""
        for attempt in range(self.retry.attempts):
            last = attempt == self.retry.attempts - 1
            try:
                reply = self._http.request(method, path, body=json, params=_clean(params))
            except _connections.NoAnswer as exc:
                if last or not _should_retry(method, None, exc.connect):
                    raise TransportError(f"cannot reach {self.server}: {exc}") from exc
                time.sleep(self.retry.delay(attempt, None))
                continue
            if 200 <= reply.status < 300:
                return _json_loads(reply.body) if reply.body else None
            if not last and _should_retry(method, reply.status, False):
                time.sleep(self.retry.delay(attempt, reply.retry_after))
                continue
            raise _error_from(reply.status, reply.reason, reply.body)
        raise AssertionError("unreachable")

    def get(self, path: str, params: Params = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def list_all(self, path: str, params: Params = None) -> tuple[list[dict[str, Any]], str]:
        """Every item of a list, following pages; also the resource_version to watch from."""
        items: list[dict[str, Any]] = []
        query = dict(_clean(params) or {})
        while True:
            page = self.get(path, query)
            items.extend(page["items"])
            if not page.get("next_page_token"):
                return items, str(page["resource_version"])
            query["page_token"] = page["next_page_token"]

    def watch(
        self, path: str, resource_version: str, params: Params = None, *, timeout: float | None = None
    ) -> Iterator[WatchEvent]:
        """Changes after ``resource_version``; ends when the server ends the stream."""
        query = {**(_clean(params) or {}), "watch": "true", "resource_version": resource_version}
        if timeout is not None:
            query["timeout_seconds"] = timeout
        try:
            with self._http.stream(path, query, read_timeout=None) as response:
                if not 200 <= response.status < 300:
                    raise _error_from(response.status, response.reason, response.read())
                for line in response.lines():
                    event = _parse_line(line)
                    if event is not None:
                        yield event
        except _connections.NoAnswer as exc:
            raise TransportError(f"watch of {path} broke: {exc}") from exc


async def _sleep(seconds: float) -> None:
    # asyncio is imported here, not with the module: the CLI's blocking client never needs it.
    import asyncio

    await asyncio.sleep(seconds)


def _json_loads(content: bytes) -> Any:
    """``json.loads`` for ``Client.request``, whose ``json`` parameter hides the module."""
    return json.loads(content)


class AsyncClient:
    """The asyncio twin of ``Client``, for runners and the local daemon."""

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        headers = {"User-Agent": "devyard-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.server = server.rstrip("/")
        self.retry = retry
        import httpx

        self._http = httpx.AsyncClient(
            base_url=self.server,
            headers=headers,
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def set_token(self, token: str) -> None:
        self._http.headers["Authorization"] = f"Bearer {token}"

    def clear_token(self) -> None:
        self._http.headers.pop("Authorization", None)

    async def request(self, method: str, path: str, *, json: Any = None, params: Params = None) -> Any:
        import httpx

        for attempt in range(self.retry.attempts):
            last = attempt == self.retry.attempts - 1
            try:
                response = await self._http.request(method, path, json=json, params=_clean(params))
            except httpx.TransportError as exc:
                connect = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if last or not _should_retry(method, None, connect):
                    raise TransportError(f"cannot reach {self.server}: {exc}") from exc
                await _sleep(self.retry.delay(attempt, None))
                continue
            if response.is_success:
                return response.json() if response.content else None
            if not last and _should_retry(method, response.status_code, False):
                await _sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
                continue
            raise _error_from(response.status_code, response.reason_phrase, response.content)
        raise AssertionError("unreachable")

    async def get(self, path: str, params: Params = None) -> Any:
        return await self.request("GET", path, params=params)

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.request("POST", path, json=body)

    async def patch(self, path: str, body: Any) -> Any:
        return await self.request("PATCH", path, json=body)

    async def put(self, path: str, body: Any) -> Any:
        return await self.request("PUT", path, json=body)

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)

    async def list_all(self, path: str, params: Params = None) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        query = dict(_clean(params) or {})
        while True:
            page = await self.get(path, query)
            items.extend(page["items"])
            if not page.get("next_page_token"):
                return items, str(page["resource_version"])
            query["page_token"] = page["next_page_token"]

    async def watch(
        self, path: str, resource_version: str, params: Params = None, *, timeout: float | None = None
    ) -> AsyncIterator[WatchEvent]:
        import httpx

        query = {**(_clean(params) or {}), "watch": "true", "resource_version": resource_version}
        if timeout is not None:
            query["timeout_seconds"] = timeout
        try:
            async with self._http.stream("GET", path, params=query, timeout=httpx.Timeout(30.0, read=None)) as response:
                if not response.is_success:
                    await response.aread()
                    raise _error_from(response.status_code, response.reason_phrase, response.content)
                async for line in response.aiter_lines():
                    event = _parse_line(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise TransportError(f"watch of {path} broke: {exc}") from exc
