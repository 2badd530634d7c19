"""The CLI's HTTP/1.1 client (``devyard.client._connections.ConnectionPool``) against a scripted server on a real
socket: the answers a server may give (lengths, chunks, a closing connection, interim answers, garbage) and
what the pool does with its connections (kept, reused, dropped when the server closed them)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devyard.client import _connections


@dataclass
class _Script:
    """Answers, in order, one per request; what the server received, and how many connections it accepted."""

    answers: list[bytes]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    #: Close each connection after this many answers on it (None: keep it open).
    close_after: int | None = None


@contextmanager
def _server(script: _Script, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(connection: socket.socket) -> None:
        if tls is not None:
            try:
                connection = tls.wrap_socket(connection, server_side=True)
            except (ssl.SSLError, OSError):
                connection.close()
                return  # the client refused the certificate
        reader = connection.makefile("rb")
        answered = 0
        with connection, reader:
            while script.answers and not stop.is_set():
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                script.requests.append(head + reader.read(length))
                connection.sendall(script.answers.pop(0))
                answered += 1
                if script.close_after is not None and answered >= script.close_after:
                    return

    def accept() -> None:
        listener.settimeout(0.05)  # to notice ``stop``: closing a socket does not end an accept() in progress
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(None)
            script.connections += 1
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        scheme = "https" if tls is not None else "http"
        yield f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/prefix"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _pool(url: str) -> _connections.ConnectionPool:
    return _connections.ConnectionPool(url, {"Authorization": "Bearer secret"}, timeout=10)


def test_requests_share_one_kept_alive_connection() -> None:
    script = _Script([_answer(b'{"a":1}', "Retry-After: 3", status="429 Too Many"), _answer(b"second")])
    with _server(script) as url:
        pool = _pool(url)
        first = pool.request("POST", "/things", body={"name": "é"}, params={"flag": True, "n": [1, 2]})
        second = pool.request("GET", "/things/1")
        pool.close()
    assert (first.status, first.reason, first.retry_after, first.body) == (429, "Too Many", "3", b'{"a":1}')
    assert second.body == b"second"
    assert script.connections == 1
    head, _, body = script.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /prefix/things?flag=true&n=1&n=2 HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer secret" in head and b"\r\nHost: 127.0.0.1:" in head
    assert body == '{"name":"é"}'.encode()


def test_a_post_without_a_body_says_so() -> None:
    script = _Script([_answer(b"")])
    with _server(script) as url:
        assert _pool(url).request("POST", "/access").status == 200
    assert b"\r\nContent-Length: 0\r\n" in script.requests[0]


def test_a_connection_the_server_closed_is_not_reused() -> None:
    script = _Script([_answer(b"one"), _answer(b"two")], close_after=1)
    with _server(script) as url:
        pool = _pool(url)
        assert pool.request("GET", "/1").body == b"one"
        threading.Event().wait(0.2)  # the server has closed the idle connection by now
        assert pool.request("GET", "/2").body == b"two"
    assert script.connections == 2 and len(script.requests) == 2


def test_connection_close_and_a_body_to_the_end_of_the_connection() -> None:
    script = _Script([b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", _answer(b"next")], close_after=1)
    with _server(script) as url:
        pool = _pool(url)
        assert pool.request("GET", "/1").body == b"until the end"
        assert pool.request("GET", "/2").body == b"next"
    assert script.connections == 2


def test_interim_answers_are_skipped() -> None:
    script = _Script([b"HTTP/1.1 100 Continue\r\n\r\n" + _answer(b"final", status="201 Created")])
    with _server(script) as url:
        reply = _pool(url).request("PUT", "/x", body={})
    assert (reply.status, reply.body) == (201, b"final")


def test_a_chunked_stream_comes_line_by_line_on_a_connection_of_its_own() -> None:
    chunks = [b'{"n": 1}\n{"n"', b": 2}\n", b'{"n": 3}']
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\nTrailer: x\r\n\r\n"
    stream_answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    script = _Script([_answer(b"before"), stream_answer, _answer(b"after")])
    with _server(script) as url:
        pool = _pool(url)
        assert pool.request("GET", "/before").body == b"before"
        with pool.stream("/watch", {"watch": True}, read_timeout=None) as stream:
            assert stream.status == 200
            assert list(stream.lines()) == ['{"n": 1}', '{"n": 2}', '{"n": 3}']
        assert pool.request("GET", "/after").body == b"after"
    # The stream took a connection of its own; the request after it went on the kept one.
    assert script.connections == 2


def test_an_error_body_of_a_stream_is_read_whole() -> None:
    script = _Script([_answer(b'{"error": {"code": "gone"}}', status="410 Gone")])
    with _server(script) as url, _pool(url).stream("/watch", None, read_timeout=None) as stream:
        assert (stream.status, stream.read()) == (410, b'{"error": {"code": "gone"}}')


@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", b""],
    ids=["not http", "short body", "nothing"],
)
def test_a_broken_answer_is_no_answer(answer: bytes) -> None:
    script = _Script([answer], close_after=1)
    with _server(script) as url, pytest.raises(_connections.NoAnswer) as info:
        _pool(url).request("GET", "/x")
    assert not info.value.connect


def test_nothing_listening_is_no_answer_before_sending() -> None:
    with _server(_Script([])) as url:
        pass
    with pytest.raises(_connections.NoAnswer) as info:
        _pool(url).request("POST", "/x", body={})
    assert info.value.connect


def self_signed_certificate(directory: Path, name: str) -> Path:
    """A self-signed certificate for 127.0.0.1, made by openssl; its key is in the same file."""
    path = directory / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(path), "-out", str(path)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return path


def test_https_trusts_the_certificates_it_is_told_to_and_no_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_certificate, other = self_signed_certificate(tmp_path, "server"), self_signed_certificate(tmp_path, "other")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(server_certificate)
    script = _Script([_answer(b"over tls")])
    with _server(script, tls) as url:
        monkeypatch.setenv("SSL_CERT_FILE", str(other))
        with pytest.raises(_connections.NoAnswer, match="CERTIFICATE_VERIFY_FAILED") as info:
            _pool(url).request("GET", "/x")
        assert info.value.connect
        monkeypatch.setenv("SSL_CERT_FILE", str(server_certificate))
        assert _pool(url).request("GET", "/x").body == b"over tls"
