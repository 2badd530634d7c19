"""Fixtures of the image store's tests: registries with basic and token auth, a faulty registry, a fresh store.

``faulty_registry`` is a small HTTP server speaking the distribution API's read side over an OCI layout, which
can drop a blob's connection after some bytes or serve wrong bytes, and counts requests: the part of a registry
a real one cannot be made to do on purpose.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devyard.runner.images.image import IdRange
from devyard.runner.images.store import ImageStore
from support import host
from support import registry as registry_support
from support.registry import RegistryServer, TokenServer

#: Unusual on purpose, so shifted ownership cannot pass by accident.
ID_RANGE = IdRange(start=2_000_000, size=65536)


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RegistryServer, TokenServer]]:
    host.require("docker-registry")
    with registry_support.running_registry(tmp_path_factory.mktemp("token-registry"), auth="token") as (server, tokens):
        assert tokens is not None
        yield server, tokens


@pytest.fixture
def store(tmp_path: Path, registry: RegistryServer) -> Iterator[ImageStore]:
    """A fresh store (root: unpacking chowns) that reaches the open test registry over http."""
    host.require()
    image_store = ImageStore(tmp_path / "store", id_range=ID_RANGE, insecure={registry.host})
    yield image_store
    image_store.close()


@dataclass
class FaultyRegistry:
    """What ``faulty_registry`` serves and how it misbehaves; tests set the fields."""

    layout: Path
    host: str = ""
    #: digest -> bytes after which the connection is dropped, for the next ``drop_times[digest]`` requests.
    drop_after: dict[str, int] = field(default_factory=dict)
    drop_times: dict[str, int] = field(default_factory=dict)
    #: Digests served with their last byte changed.
    corrupt: set[str] = field(default_factory=set)
    #: Seconds each blob answer waits before its body (so concurrent pulls overlap).
    delay: float = 0.0
    honour_range: bool = True
    #: (method, path, Range header or "") of every request.
    requests: list[tuple[str, str, str]] = field(default_factory=list)

    def blob_requests(self, digest: str) -> list[str]:
        return [byte_range for _, path, byte_range in self.requests if path.endswith(f"/blobs/{digest}")]

    def answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path = handler.path
        byte_range = handler.headers.get("Range") or ""
        self.requests.append((handler.command, path, byte_range))
        if path == "/v2/":
            self._send(handler, 200, b"{}", "application/json")
            return
        _, kind, lookup = _split(path)
        if kind == "manifests":
            index = json.loads((self.layout / "index.json").read_bytes())
            digest = index["manifests"][0]["digest"] if not lookup.startswith("sha256:") else lookup
            blob = self._blob(digest)
            if blob is None:
                self._send(handler, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}', "application/json")
                return
            media_type = json.loads(blob).get("mediaType", "application/vnd.oci.image.manifest.v1+json")
            self._send(handler, 200, blob, media_type, head=handler.command == "HEAD")
            return
        blob = self._blob(lookup) if kind == "blobs" else None
        if blob is None:
            self._send(handler, 404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}', "application/json")
            return
        if lookup in self.corrupt:
            blob = blob[:-1] + bytes([blob[-1] ^ 0xFF])
        start = 0
        if byte_range and self.honour_range:
            start = int(byte_range.removeprefix("bytes=").split("-")[0])
        body = blob[start:]
        time.sleep(self.delay)
        handler.send_response(206 if start else 200)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if self.drop_times.get(lookup, 0) > 0:
            self.drop_times[lookup] -= 1
            handler.wfile.write(body[: self.drop_after[lookup]])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        handler.wfile.write(body)

    def _blob(self, digest: str) -> bytes | None:
        path = self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
        return path.read_bytes() if path.exists() else None

    @staticmethod
    def _send(
        handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes, media_type: str, head: bool = False
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", media_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)


def _split(path: str) -> tuple[str, str, str]:
    rest = path.removeprefix("/v2/")
    for kind in ("manifests", "blobs"):
        marker = f"/{kind}/"
        if marker in rest:
            name, _, lookup = rest.rpartition(marker)
            return name, kind, lookup
    return rest, "", ""


def serve_faulty(layout: Path) -> Iterator[FaultyRegistry]:
    faulty = FaultyRegistry(layout)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            faulty.answer(self)

        def do_HEAD(self) -> None:
            faulty.answer(self)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    faulty.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="faulty-registry", daemon=True)
    thread.start()
    try:
        yield faulty
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
