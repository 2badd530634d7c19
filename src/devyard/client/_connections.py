"""The blocking client's HTTP/1.1 connections, on the standard library's ``http.client``; ``_http.Client`` uses them.

Why not httpx here: the ``devyard`` command makes one to a few requests per process, and importing httpx (which
also imports rich and pygments for its own command line) and building its TLS context cost about 0.13 s, more
than everything else the command does. ``http.client`` is already loaded and costs nothing to set up. httpx
stays the transport when the caller passes one (tests record requests through it), when a proxy variable is
set (httpx honours ``HTTP(S)_PROXY``, ``ALL_PROXY`` and ``NO_PROXY``; this module does not), and for
``AsyncClient``.

A ``ConnectionPool`` is safe to share between threads: each request takes an idle connection (or opens one) and
gives it back once the response is read to the end. A connection the server closed while it was idle is noticed
before it is reused, so a request is never sent twice by this module.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

if TYPE_CHECKING:
    import ssl

__all__ = ["ConnectionPool", "NoAnswer", "Reply", "Stream", "proxy_configured"]

_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy"})


def proxy_configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a proxy variable is set, in which case httpx (which knows the proxy rules) carries the requests."""
    return any(key.lower() in _PROXY_VARIABLES and value for key, value in environ.items())


class NoAnswer(Exception):
    """The request got no response; ``connect`` says it never reached the server (so it is safe to send again)."""

    def __init__(self, message: str, *, connect: bool) -> None:
        super().__init__(message)
        self.connect = connect


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    retry_after: str | None
    body: bytes


class Stream:
    """A response whose body is read as it comes: ``lines()`` for NDJSON, or ``read()`` for an error's body."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason

    def read(self) -> bytes:
        try:
            return self._response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise NoAnswer(str(exc) or type(exc).__name__, connect=False) from exc

    def lines(self) -> Iterator[str]:
        try:
            while line := self._response.readline():
                yield line.decode("utf-8").rstrip("\r\n")
        except (OSError, http.client.HTTPException) as exc:
            raise NoAnswer(str(exc) or type(exc).__name__, connect=False) from exc


def _query(params: Mapping[str, Any] | None) -> str:
    """``params`` as httpx would encode them: booleans as ``true``/``false``, sequences as repeated keys."""
    if not params:
        return ""
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            pairs.append((key, "true" if item is True else "false" if item is False else str(item)))
    return "?" + urlencode(pairs)


class ConnectionPool:
    """Keep-alive connections to one server (``http://`` or ``https://``, optionally with a path prefix)."""

    def __init__(self, server: str, headers: Mapping[str, str], *, timeout: float) -> None:
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {server!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._headers = dict(headers)
        self._timeout = timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._ssl_context: ssl.SSLContext | None = None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, Any] | None = None) -> Reply:
        connection, response = self._send(method, path, body, params)
        try:
            content = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise NoAnswer(str(exc) or type(exc).__name__, connect=False) from exc
        self._give_back(connection)
        return Reply(response.status, response.reason, response.getheader("Retry-After"), content)

    @contextmanager
    def stream(self, path: str, params: Mapping[str, Any] | None, *, read_timeout: float | None) -> Iterator[Stream]:
        """A GET whose body is read as it comes; the connection is closed afterwards (the caller may stop early)."""
        connection, response = self._send("GET", path, None, params, streaming=True, read_timeout=read_timeout)
        try:
            yield Stream(response)
        finally:
            connection.close()

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        params: Mapping[str, Any] | None,
        *,
        streaming: bool = False,
        read_timeout: float | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        connection = self._take()
        headers = dict(self._headers)
        content = None
        if body is not None:
            # As httpx encodes ``json=``.
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        try:
            if connection.sock is None:
                connection.connect()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise NoAnswer(str(exc) or type(exc).__name__, connect=True) from exc
        try:
            connection.request(method, self._prefix + path + _query(params), body=content, headers=headers)
            if streaming and connection.sock is not None:
                connection.sock.settimeout(read_timeout)
            return connection, connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise NoAnswer(str(exc) or type(exc).__name__, connect=False) from exc

    def _take(self) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                return self._new()
            if _still_open(connection):
                return connection
            connection.close()

    def _give_back(self, connection: http.client.HTTPConnection) -> None:
        if connection.sock is None:  # the server said Connection: close
            return
        with self._lock:
            self._idle.append(connection)

    def _new(self) -> http.client.HTTPConnection:
        if not self._https:
            return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        if self._ssl_context is None:
            self._ssl_context = _verifying_context()
        return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._ssl_context)


def _still_open(connection: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection is readable only when the server closed it (or broke the protocol)."""
    if connection.sock is None:
        return False
    try:
        readable, _, _ = select.select([connection.sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _verifying_context() -> ssl.SSLContext:
    """The certificates httpx would trust: ``SSL_CERT_FILE`` or ``SSL_CERT_DIR`` if set, else certifi's."""
    import ssl

    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    import certifi

    return ssl.create_default_context(cafile=certifi.where())
