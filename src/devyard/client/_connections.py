"""The blocking client's connections over plain sockets: HTTP/1.1 for ``_http.Client``, and a WebSocket client
for the exec session (``cli._exec_session``).

Why not httpx here: the ``devyard`` command makes one to a few requests per process, and importing httpx (which
also imports rich and pygments for its own command line) and building its TLS context cost about 0.13 s, more
than everything else the command does. Why not ``http.client`` either: it imports the ``email`` package (to parse
header fields) and ``ssl``, a sixth of what ``devyard env create`` imports in all; this module needs neither (``ssl``
only for ``https://``). httpx stays the transport when the caller passes one (tests record requests through it),
when a proxy variable is set (httpx honours ``HTTP(S)_PROXY``, ``ALL_PROXY`` and ``NO_PROXY``; this module does
not), and for ``AsyncClient``.

HTTP/1.1 as the CLI needs it: one request at a time per connection, bodies delimited by ``Content-Length``, by
chunks, or by the end of the connection; keep-alive unless the server says ``Connection: close``.

A ``ConnectionPool`` is safe to share between threads: each request takes an idle connection (or opens one) and
gives it back once the response is read to the end. A connection the server closed while it was idle is noticed
before it is reused, so a request is never sent twice by this module.

``open_websocket`` is a WebSocket client (RFC 6455) over a plain socket, for ``devyard env exec`` and ``env create
-- CMD`` (``cli._exec_session``), for the same reason: importing the ``websockets`` package cost those commands
about 60 ms, more than the whole session through the gateway. It speaks what the runner's gateway needs (text
and binary messages, fragments, ping, close; no extensions, no subprotocols) and nothing more.
"""

from __future__ import annotations

import binascii
import contextlib
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

    def __init__(self, connection: _Connection, head: _Head) -> None:
        self._connection = connection
        self._head = head
        self.status = head.status
        self.reason = head.reason

    def read(self) -> bytes:
        try:
            return b"".join(self._connection.body_pieces(self._head))
        except (OSError, ValueError, EOFError) as exc:
            raise NoAnswer(str(exc) or type(exc).__name__, connect=False) from exc

    def lines(self) -> Iterator[str]:
        pending = b""
        try:
            for piece in self._connection.body_pieces(self._head):
                pending += piece
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line.decode("utf-8").rstrip("\r")
        except (OSError, ValueError, EOFError) as exc:
            raise NoAnswer(str(exc) or type(exc).__name__, connect=False) from exc
        if pending:
            yield pending.decode("utf-8").rstrip("\r")


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
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self._headers = {"Host": host if parts.port is None else f"{host}:{parts.port}", **headers}
        self._timeout = timeout
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._ssl_context: ssl.SSLContext | None = None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, Any] | None = None) -> Reply:
        connection, head = self._send(method, path, body, params)
        try:
            content = b"".join(connection.body_pieces(head))
        except (OSError, ValueError, EOFError) as exc:
            connection.close()
            raise NoAnswer(str(exc) or type(exc).__name__, connect=False) from exc
        if head.keep_alive:
            with self._lock:
                self._idle.append(connection)
        else:
            connection.close()
        return Reply(head.status, head.reason, head.headers.get("retry-after"), content)

    @contextmanager
    def stream(self, path: str, params: Mapping[str, Any] | None, *, read_timeout: float | None) -> Iterator[Stream]:
        """A GET whose body is read as it comes, on a connection of its own that is closed afterwards (the caller
        may stop early). The idle connections stay for the requests after it: ``env create -- CMD`` asks for its
        ticket the moment the watch says Running, and a connection (TLS and all) made then would delay it."""
        connection, head = self._send("GET", path, None, params, streaming=True, read_timeout=read_timeout)
        try:
            yield Stream(connection, head)
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
    ) -> tuple[_Connection, _Head]:
        """Send a request and read the head of its answer: on an idle connection (or a new one), or, ``streaming``,
        on a new one whose reads wait up to ``read_timeout``."""
        headers = dict(self._headers)
        content = b""
        if body is not None:
            # As httpx encodes ``json=``.
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        if body is not None or method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(content))
        target = self._prefix + path + _query(params)
        if any(character in target for character in " \r\n\t\0"):
            raise ValueError(f"a request path may not hold spaces or control characters: {target!r}")
        connection = self._open() if streaming else self._take()
        try:
            connection.send(method, target, headers, content)
        except OSError as exc:
            connection.close()
            raise NoAnswer(str(exc) or type(exc).__name__, connect=False) from exc
        try:
            connection.settimeout(read_timeout if streaming else self._timeout)
            return connection, connection.read_head(method)
        except (OSError, ValueError, EOFError) as exc:
            connection.close()
            raise NoAnswer(str(exc) or type(exc).__name__, connect=False) from exc

    def _take(self) -> _Connection:
        while True:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                return self._open()
            if connection.still_open():
                return connection
            connection.close()

    def _open(self) -> _Connection:
        try:
            sock = socket.create_connection((_resolvable(self._host), self._port), timeout=self._timeout)
        except OSError as exc:
            raise NoAnswer(str(exc) or type(exc).__name__, connect=True) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._https:
                if self._ssl_context is None:
                    self._ssl_context = _verifying_context()
                sock = self._ssl_context.wrap_socket(sock, server_hostname=self._host)
        except OSError as exc:  # the TLS handshake failed: the certificate, say
            sock.close()
            raise NoAnswer(str(exc) or type(exc).__name__, connect=True) from exc
        return _Connection(sock)


@dataclass(frozen=True)
class _Head:
    """A response's status line and header fields (names in lower case; repeated fields joined by commas)."""

    status: int
    reason: str
    headers: dict[str, str]
    #: Whether a body follows (not after HEAD, 1xx, 204 and 304).
    has_body: bool
    #: Whether the connection can carry another request once the body is read.
    keep_alive: bool


class _Connection:
    """One HTTP/1.1 connection: a request at a time, its response read through a buffered reader."""

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self._reader = sock.makefile("rb")

    def settimeout(self, timeout: float | None) -> None:
        self._socket.settimeout(timeout)

    def send(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> None:
        lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
        # One write for the head and the body: a small body sent apart waits for the server's delayed ACK.
        self._socket.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def read_head(self, method: str) -> _Head:
        _acknowledge_at_once(self._socket)
        while True:
            status, reason, headers = _read_head(self._reader)
            if not 100 <= status < 200:
                break  # an interim answer (100 Continue, 103 Early Hints) comes before the real one
        connection = headers.get("connection", "").lower()
        has_body = method != "HEAD" and status not in (204, 304)
        delimited = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        keep_alive = "close" not in connection and (delimited or not has_body)
        return _Head(status, reason, headers, has_body, keep_alive)

    def body_pieces(self, head: _Head) -> Iterator[bytes]:
        """The body as it comes: chunk by chunk, or read by read up to its length or the end of the connection."""
        if not head.has_body:
            return
        reader = self._reader
        if "chunked" in head.headers.get("transfer-encoding", "").lower():
            while True:
                # A watch's events may come a few ms apart, each a write of its own: each is acknowledged at once.
                _acknowledge_at_once(self._socket)
                size = int(reader.readline(_MAX_LINE).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while reader.readline(_MAX_LINE).strip():  # trailer fields, then the blank line
                        pass
                    return
                piece = reader.read(size)
                if len(piece) != size or reader.readline(_MAX_LINE).strip():
                    raise EOFError("the connection ended inside a chunk")
                yield piece
        elif "content-length" in head.headers:
            remaining = int(head.headers["content-length"])
            while remaining > 0:
                piece = reader.read1(min(remaining, _READ_SIZE))
                if not piece:
                    raise EOFError(f"the connection ended {remaining} bytes short of the body")
                remaining -= len(piece)
                yield piece
        else:
            while piece := reader.read1(_READ_SIZE):
                yield piece

    def still_open(self) -> bool:
        """An idle keep-alive connection is readable only when the server closed it (or broke the protocol)."""
        try:
            readable, _, _ = select.select([self._socket], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        self._reader.close()
        self._socket.close()


_MAX_LINE = 65536
_MAX_HEADER_LINES = 100
_READ_SIZE = 64 * 1024


def _acknowledge_at_once(sock: socket.socket) -> None:
    """Acknowledge what comes next at once (Linux's TCP_QUICKACK; it lasts a while, not for good). On a connection
    that has carried a request before, the kernel delays its acknowledgements by up to 40 ms, and a server that
    writes an answer's head and body apart may hold the body until the head is acknowledged: 40 ms per request."""
    with contextlib.suppress(AttributeError, OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _read_head(reader: Any) -> tuple[int, str, dict[str, str]]:
    """A response's status line and header fields, from a buffered reader; ``ValueError`` when it is not HTTP."""
    status_line = reader.readline(_MAX_LINE).decode("latin-1")
    if not status_line:
        raise EOFError("the server closed the connection without an answer")
    protocol, _, rest = status_line.rstrip("\r\n").partition(" ")
    code, _, reason = rest.partition(" ")
    if not protocol.startswith("HTTP/1.") or not (code.isdigit() and len(code) == 3):
        raise ValueError(f"the server does not speak HTTP/1.1: {status_line.strip()[:100]!r}")
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADER_LINES):
        line = reader.readline(_MAX_LINE).decode("latin-1").rstrip("\r\n")
        if not line:
            return int(code), reason.strip(), headers
        name, separator, value = line.partition(":")
        if not separator:
            raise ValueError(f"the server sent a broken header line: {line[:100]!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    raise ValueError(f"the server's answer has more than {_MAX_HEADER_LINES} header lines")


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
        sock = socket.create_connection((_resolvable(parts.hostname), port), timeout=timeout)
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
    # binascii, not base64, whose import (a module of its own, on top of binascii) the exec session need not pay.
    key = binascii.b2a_base64(os.urandom(16), newline=False).decode()
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
        status, reason, answer = _read_head(reader)
        if status != 101:
            length = min(int(answer.get("content-length", "0") or 0), _MAX_REFUSAL_BODY)
            body = reader.read(length).decode(errors="replace").strip() if length > 0 else ""
            raise WebSocketRefused(status, reason, body)
    except (OSError, ValueError, EOFError) as exc:
        raise NoAnswer(str(exc) or type(exc).__name__, connect=False) from exc
    expected = binascii.b2a_base64(_sha1(key.encode() + _WEBSOCKET_GUID), newline=False).decode()
    if answer.get("upgrade", "").lower() != "websocket" or answer.get("sec-websocket-accept") != expected:
        raise NoAnswer("the server accepted the upgrade without speaking WebSocket", connect=False)


def _sha1(data: bytes) -> bytes:
    """SHA-1, for the handshake's accept key: from CPython's built-in ``_sha1`` where there is one, because
    ``hashlib`` loads OpenSSL's libcrypto first, which costs the exec session a few milliseconds."""
    try:
        import _sha1 as builtin  # type: ignore[import-not-found]
    except ImportError:
        import hashlib as builtin
    digest: bytes = builtin.sha1(data).digest()
    return digest


def _resolvable(host: str) -> Any:
    """``host`` for ``socket.create_connection``: an ASCII name as bytes, which the resolver takes as it is, where
    a string would load the ``idna`` codec (a few milliseconds) to encode it."""
    return host.encode("ascii") if host.isascii() else host
