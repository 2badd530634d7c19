"""The exec session's own WebSocket client (``devyard.client._connections.open_websocket``) against a standard
server, the ``websockets`` package that the runner's gateway is built on: masking, long and fragmented messages,
pings, the close handshake, refusals, and messages over the limit."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.sync.server import ServerConnection, serve

from devyard.client import _connections

from .test_http_connections import self_signed_certificate

Handler = Callable[[ServerConnection], None]


@contextmanager
def _server(handler: Handler, refuse: Response | None = None, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        return refuse

    with serve(handler, "127.0.0.1", 0, process_request=process_request, compression=None, ssl=tls) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"{'wss' if tls else 'ws'}://127.0.0.1:{server.socket.getsockname()[1]}/v1/test"
        finally:
            server.shutdown()
            thread.join(10)


def _echo(connection: ServerConnection) -> None:
    assert connection.request is not None
    connection.send(connection.request.headers.get("Authorization", ""))
    for message in connection:
        connection.send(message)


def test_messages_go_both_ways_masked_and_whole() -> None:
    payload = bytes(range(256)) * 400  # over 64 KiB: the longest length encoding
    with _server(_echo) as url, _connections.open_websocket(url, {"Authorization": "Bearer t"}, timeout=10) as ws:
        assert ws.receive() == "Bearer t"
        for message in ("héllo", b"", b"\x00\x01", payload, "x" * 200):
            if isinstance(message, str):
                ws.send_text(message)
            else:
                ws.send_binary(message)
            assert ws.receive(timeout=10) == message


def test_fragments_pings_and_the_close_handshake() -> None:
    closed = threading.Event()

    def handler(connection: ServerConnection) -> None:
        connection.send(["frag", "mented"])
        connection.send([b"\x01", b"\x02\x03"])
        connection.ping(b"are you there").wait(10)  # answered by the client inside receive
        connection.send("after the ping")
        connection.close(4000, "done here")
        closed.set()

    with _server(handler) as url, _connections.open_websocket(url, {}, timeout=10) as ws:
        assert ws.receive(timeout=10) == "fragmented"
        assert ws.receive(timeout=10) == b"\x01\x02\x03"
        assert ws.receive(timeout=10) == "after the ping"
        with pytest.raises(_connections.WebSocketClosed) as info:
            ws.receive(timeout=10)
        assert (info.value.code, info.value.reason) == (4000, "done here")
        assert closed.wait(10), "the server's close was answered, so its close() returned"
        with pytest.raises(_connections.WebSocketClosed):
            ws.send_text("too late")


def test_a_refusal_carries_the_status_and_the_servers_words() -> None:
    refusal = Response(403, "Forbidden", Headers([("Content-Length", "19")]), b"the ticket was used")
    with _server(_echo, refuse=refusal) as url, pytest.raises(_connections.WebSocketRefused) as info:
        _connections.open_websocket(url, {}, timeout=10)
    assert (info.value.status, info.value.body) == (403, "the ticket was used")


def test_a_message_over_the_limit_closes_the_connection() -> None:
    def handler(connection: ServerConnection) -> None:
        connection.send(b"y" * 5000)
        connection.recv()

    with _server(handler) as url, _connections.open_websocket(url, {}, timeout=10, max_size=4096) as ws:
        with pytest.raises(_connections.WebSocketClosed) as info:
            ws.receive(timeout=10)
        assert info.value.code == 1009


def test_nothing_listening_is_no_answer() -> None:
    with _server(_echo) as url:
        pass
    with pytest.raises(_connections.NoAnswer) as info:
        _connections.open_websocket(url, {}, timeout=10)
    assert info.value.connect


def test_wss_checks_the_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    certificate = self_signed_certificate(tmp_path, "gateway")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certificate)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    with _server(_echo, tls=tls) as url, _connections.open_websocket(url, {"Authorization": "x"}, timeout=10) as ws:
        assert url.startswith("wss://")
        assert ws.receive(timeout=10) == "x"
        ws.send_binary(b"\x00secret")
        assert ws.receive(timeout=10) == b"\x00secret"
