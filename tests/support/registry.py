"""A real OCI registry for tests: Debian's ``docker-registry`` on 127.0.0.1, open, with basic auth, or with tokens.

``running_registry(workdir, auth=...)`` starts one on a free port with its storage in ``workdir`` and stops it
on exit. ``auth="basic"`` protects it with an htpasswd file (bcrypt) for ``USERS``; ``auth="token"`` makes it
trust JWTs signed by a test key, issued by ``TokenServer`` (a small HTTP server in a thread of this process that
checks basic credentials and grants: everything to a known user, pull of ``public/*`` to anyone).

Used by the session fixture ``registry`` (tests/conftest.py) and the image store's tests.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import json
import secrets
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import bcrypt
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

__all__ = ["USERS", "RegistryServer", "TokenServer", "free_port", "running_registry"]

#: The accounts of the basic-auth and token registries.
USERS: Mapping[str, str] = {"alice": "wonderland"}
_SERVICE = "devyard-test-registry"
_ISSUER = "devyard-test-issuer"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class RegistryServer:
    """A running registry: ``host`` (``127.0.0.1:PORT``, what references and ``insecure`` use) and its URL."""

    host: str
    auth: str
    root: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def reference(self, name: str) -> str:
        """``name`` (``repository:tag``) on this registry."""
        return f"{self.host}/{name}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry tokens (RS256 JWTs with the signing certificate in ``x5c``) at ``url``/token."""

    def __init__(self, workdir: Path, users: Mapping[str, str] = USERS) -> None:
        self.users = dict(users)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "devyard test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.certificate_path = workdir / "token-cert.pem"
        self.certificate_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        #: Token requests answered, and refused.
        self.issued = 0
        self.refused = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = server.answer(self.path, self.headers.get("Authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, name="token-server", daemon=True)

    def __enter__(self) -> TokenServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()

    def answer(self, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        user = ""
        if authorization:
            scheme, _, encoded = authorization.partition(" ")
            name, _, password = base64.b64decode(encoded).decode().partition(":")
            if scheme.lower() != "basic" or self.users.get(name) != password:
                self.refused += 1
                return 401, {"details": "wrong credentials"}
            user = name
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            repository, _, actions = rest.rpartition(":")
            granted = actions.split(",") if user else (["pull"] if repository.startswith("public/") else [])
            access.append({"type": kind, "name": repository, "actions": granted})
        self.issued += 1
        return 200, {"token": self.token(user, access), "expires_in": 300}

    def token(self, subject: str, access: list[dict[str, Any]]) -> str:
        certificate = self.certificate.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(certificate).decode()]}
        now = int(time.time())
        claims = {
            "iss": _ISSUER,
            "sub": subject,
            "aud": _SERVICE,
            "exp": now + 300,
            "nbf": now - 30,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


def _config(workdir: Path, port: int, auth: str, token_server: TokenServer | None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {workdir / 'storage'}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        f"  secret: {secrets.token_hex(16)}",
    ]
    if auth == "basic":
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(
            "".join(
                f"{name}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                for name, password in USERS.items()
            )
        )
        lines += ["auth:", "  htpasswd:", "    realm: devyard-test", f"    path: {htpasswd}"]
    elif auth == "token":
        assert token_server is not None
        lines += [
            "auth:",
            "  token:",
            f"    realm: {token_server.url}/token",
            f"    service: {_SERVICE}",
            f"    issuer: {_ISSUER}",
            f"    rootcertbundle: {token_server.certificate_path}",
        ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_registry(
    workdir: Path, *, auth: Literal["none", "basic", "token"] = "none"
) -> Iterator[tuple[RegistryServer, TokenServer | None]]:
    """Run ``docker-registry`` on a free port of 127.0.0.1 until the block ends; with ``auth="token"`` also
    the token server it trusts (else ``None``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        token_server = stack.enter_context(TokenServer(workdir)) if auth == "token" else None
        port = free_port()
        config = workdir / "config.yml"
        config.write_text(_config(workdir, port, auth, token_server))
        log = (workdir / "registry.log").open("wb")
        stack.callback(log.close)
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

        def stop() -> None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

        stack.callback(stop)
        host = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(workdir / 'registry.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"http://{host}/v2/", timeout=1).status_code in (200, 401):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not answer on {host} within 20 s")
            time.sleep(0.05)
        yield RegistryServer(host=host, auth=auth, root=workdir), token_server
