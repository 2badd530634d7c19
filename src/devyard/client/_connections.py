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

``open_websocket`` is a WebSocket client (RFC 6455) over a plain socket, for ``devyard env exec`` and ``env create
-- CMD`` (``cli._exec_session``), for the same reason: importing the ``websockets`` package cost those commands
about 60 ms, more than the whole session through the gateway. It speaks what the runner's gateway needs (text
and binary messages, fragments, ping, close; no extensions, no subprotocols) and nothing more.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import select
import socket
import struct
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

if TYPE_CHECKING:
    import ssl

__all__ = [
    "ConnectionPool",
    "NoAnswer",
    "Reply",
    "Stream",
    "WebSocket",
    "WebSocketClosed",
    "WebSocketRefused",
    "open_websocket",
    "proxy_configured",
]

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
        """A GET whose body is read as it comes, on a connection of its own that is closed afterwards (the caller
        may stop early). The idle connections stay for the requests after it: ``env create -- CMD`` asks for its
        ticket the moment the watch says Running, and a connection (TLS and all) made then would delay it."""
        connection, response = self._send(
            "GET", path, None, params, streaming=True, read_timeout=read_timeout, fresh=True
        )
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
        fresh: bool = False,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        connection = self._new() if fresh else self._take()
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


# The WebSocket client.

#: RFC 6455 section 1.3: what the server hashes the client's key with.
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_HEADER_LINES = 100
_MAX_REFUSAL_BODY = 64 * 1024


class WebSocketRefused(Exception):
    """The server answered the upgrade with another status than 101; ``body`` says why, in its words."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"{status} {reason}: {body}" if body else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.body = body


class WebSocketClosed(Exception):
    """The connection is closed or broke: ``code`` is the close code (1006 when the connection was cut)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}".strip())
        self.code = code
        self.reason = reason


class WebSocket:
    """An open client WebSocket. ``receive`` is for one thread; ``send_*`` and ``close`` may be called from any
    (they hold a lock, so frames never interleave). The server's pings are answered inside ``receive``."""

    def __init__(self, sock: socket.socket, reader: Any, *, max_size: int) -> None:
        self._socket = sock
        self._reader = reader
        self._max_size = max_size
        self._send_lock = threading.Lock()
        self._close_sent = False
        self._closed: WebSocketClosed | None = None

    def __enter__(self) -> WebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_text(self, text: str) -> None:
        self._send(_TEXT, text.encode())

    def send_binary(self, data: bytes) -> None:
        self._send(_BINARY, data)

    def receive(self, timeout: float | None = None) -> str | bytes:
        """The next message; ``WebSocketClosed`` once the server closed (after answering its close), the
        connection broke, or ``timeout`` seconds passed without a frame (code 1006)."""
        if self._closed is not None:
            raise self._closed
        self._socket.settimeout(timeout)
        parts: list[bytes] = []
        kind = None
        size = 0
        try:
            while True:
                final, opcode, payload = self._frame()
                if opcode == _PING:
                    self._send(_PONG, payload)
                elif opcode == _CLOSE:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    reason = payload[2:].decode(errors="replace")
                    self._send_close(1000 if code == 1005 else code)
                    raise self._finish(code, reason)
                elif opcode == _PONG:
                    continue
                elif (opcode in (_TEXT, _BINARY) and kind is None) or (opcode == _CONTINUATION and kind is not None):
                    kind = opcode if kind is None else kind
                    size += len(payload)
                    if size > self._max_size:
                        self._send_close(1009)
                        raise self._finish(1009, f"a message of more than {self._max_size} bytes")
                    parts.append(payload)
                    if final:
                        message = b"".join(parts)
                        return message.decode() if kind == _TEXT else message
                else:
                    self._send_close(1002)
                    raise self._finish(1002, f"unexpected frame (opcode {opcode})")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise self._finish(1006, str(exc) or type(exc).__name__) from None
        finally:
            if self._closed is None:
                self._socket.settimeout(None)

    def close(self, code: int = 1000) -> None:
        """Say goodbye (if not said yet) and close the socket, without waiting for the server's answer. Called
        by the thread that receives, once it is done."""
        self._send_close(code)
        if self._closed is None:
            self._closed = WebSocketClosed(code, "closed by this side")
        self._reader.close()
        self._socket.close()

    def _frame(self) -> tuple[bool, int, bytes]:
        head = self._exact(2)
        final, opcode, masked, length = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x80, head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._exact(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._exact(8))[0]
        if length > self._max_size:
            self._send_close(1009)
            raise self._finish(1009, f"a frame of {length} bytes")
        key = self._exact(4) if masked else b""
        payload = self._exact(length)
        return bool(final), opcode, _mask(payload, key) if masked else payload

    def _exact(self, count: int) -> bytes:
        data = self._reader.read(count) if count else b""
        if len(data) != count:
            raise EOFError("the server closed the connection")
        return bytes(data)

    def _send(self, opcode: int, payload: bytes) -> None:
        # A client masks every frame (RFC 6455 section 5.3), with a fresh key each time.
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        key = os.urandom(4)
        with self._send_lock:
            if self._closed is not None:
                raise self._closed
            try:
                self._socket.sendall(head + key + _mask(payload, key))
            except OSError as exc:
                raise self._finish(1006, str(exc) or type(exc).__name__) from None

    def _send_close(self, code: int) -> None:
        with self._send_lock:
            if self._close_sent or self._closed is not None:
                return
            self._close_sent = True
        with contextlib.suppress(WebSocketClosed):
            self._send(_CLOSE, struct.pack("!H", code))

    def _finish(self, code: int, reason: str) -> WebSocketClosed:
        """Mark the connection closed and shut the socket down, which wakes a ``receive`` in another thread with
        an end of file; ``close`` releases it."""
        self._closed = WebSocketClosed(code, reason)
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        return self._closed


def _mask(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` repeated: as one big integer, a hundred times faster than per byte."""
    count = len(data)
    if not count:
        return b""
    repeated = (key * (count // 4 + 1))[:count]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(count, "little")


def open_websocket(url: str, headers: Mapping[str, str], *, timeout: float, max_size: int = 1 << 20) -> WebSocket:
    """Connect to ``ws://`` or ``wss://`` ``url`` and upgrade; ``NoAnswer`` when the server cannot be reached or
    does not speak WebSocket, ``WebSocketRefused`` when it answers the upgrade with an HTTP error."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    try:
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
    except OSError as exc:
        raise NoAnswer(str(exc) or type(exc).__name__, connect=True) from exc
    try:
        # Each keystroke and each line of output is a frame of its own: Nagle's algorithm would hold them back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure:
            sock = _verifying_context().wrap_socket(sock, server_hostname=parts.hostname)
        reader = sock.makefile("rb")
    except OSError as exc:  # the TLS handshake failed: the certificate, say
        sock.close()
        raise NoAnswer(str(exc) or type(exc).__name__, connect=True) from exc
    try:
        _handshake(sock, reader, parts.hostname, parts.port, parts.path or "/", parts.query, headers)
    except BaseException:
        reader.close()
        sock.close()
        raise
    sock.settimeout(None)
    return WebSocket(sock, reader, max_size=max_size)


def _handshake(
    sock: socket.socket,
    reader: Any,
    hostname: str,
    port: int | None,
    path: str,
    query: str,
    headers: Mapping[str, str],
) -> None:
    import hashlib  # here: only a WebSocket needs it

    key = base64.b64encode(os.urandom(16)).decode()
    host = f"[{hostname}]" if ":" in hostname else hostname
    lines = [
        f"GET {path}{'?' + query if query else ''} HTTP/1.1",
        f"Host: {host}{f':{port}' if port else ''}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "User-Agent: devyard-client",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status_line = reader.readline(65537).decode("latin-1")
        protocol, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not protocol.startswith("HTTP/1.") or not code.isdigit():
            raise NoAnswer(f"the server does not speak HTTP: {status_line.strip()[:100]!r}", connect=False)
        answer: dict[str, str] = {}
        for _ in range(_MAX_HEADER_LINES):
            line = reader.readline(65537).decode("latin-1").rstrip("\r\n")
            if not line:
                break
            name, _, value = line.partition(":")
            answer[name.strip().lower()] = value.strip()
        else:
            raise NoAnswer("the server's answer to the upgrade has too many header lines", connect=False)
        if int(code) != 101:
            length = min(int(answer.get("content-length", "0") or 0), _MAX_REFUSAL_BODY)
            body = reader.read(length).decode(errors="replace").strip() if length > 0 else ""
            raise WebSocketRefused(int(code), reason.strip(), body)
    except (OSError, ValueError) as exc:
        raise NoAnswer(str(exc) or type(exc).__name__, connect=False) from exc
    expected = base64.b64encode(hashlib.sha1(key.encode() + _WEBSOCKET_GUID).digest()).decode()
    if answer.get("upgrade", "").lower() != "websocket" or answer.get("sec-websocket-accept") != expected:
        raise NoAnswer("the server accepted the upgrade without speaking WebSocket", connect=False)
