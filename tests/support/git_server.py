"""A real git server on 127.0.0.1 for tests that clone over http: Debian's ``git http-backend`` run as a CGI
program by a small HTTP server (basic auth on ``private.git``: ``USERNAME`` and ``PASSWORD``), and the helpers
that make the repositories it serves.

Used by the content tests (``tests/runner/content/conftest.py``, which adds its own repositories) and by the
linux runner's dev container tests (``tests/runner/linux/test_dev_containers.py``).
"""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = [
    "PASSWORD",
    "USERNAME",
    "GitServer",
    "commit",
    "git",
    "publish",
    "publish_bare",
    "publish_work",
    "serving",
]

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
USERNAME = "alice"
PASSWORD = "s3cret-token-0f9e8d"


@dataclass(frozen=True)
class GitServer:
    """A running server: its base URL (``{url}/NAME`` clones ``root/NAME``) and the folder of bare repositories."""

    url: str
    root: Path


class _GitHandler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows failures
        pass

    def _serve(self) -> None:
        path, _, query = self.path.partition("?")
        if path.startswith("/private.git/") and not self._authorized():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="private"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self._body()
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.server.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }
        result = subprocess.run([HTTP_BACKEND], input=body, capture_output=True, env=environment, check=False)
        head, _, payload = result.stdout.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _authorized(self) -> bool:
        expected = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
        return self.headers.get("Authorization", "") == f"Basic {expected}"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _GitHandler)
        self.root = root


def git(*arguments: str, cwd: Path | None = None) -> str:
    """Run git as the tests' author, without the host's configuration; its output."""
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd or "/"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "LC_ALL": "C",
    }
    done = subprocess.run(["git", *arguments], cwd=cwd, env=environment, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def commit(work: Path, name: str, text: str) -> str:
    (work / name).parent.mkdir(parents=True, exist_ok=True)
    (work / name).write_text(text)
    git("add", name, cwd=work)
    git("commit", "--quiet", "-m", f"{name}: {text}", cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


def publish(server: GitServer, name: str, files: dict[str, str], *, executable: tuple[str, ...] = ()) -> str:
    """Serve a new repository ``name`` holding ``files`` (path: text; ``executable`` ones with mode 755, a
    text starting ``->`` a symbolic link to the rest); its URL."""
    work = server.root.parent / "work" / name
    git("init", "--quiet", "--initial-branch=main", str(work))
    for path, text in files.items():
        file = work / path
        file.parent.mkdir(parents=True, exist_ok=True)
        if text.startswith("->"):
            file.symlink_to(text[2:])
        else:
            file.write_text(text)
            file.chmod(0o755 if path in executable else 0o644)
    git("add", "--all", cwd=work)
    git("commit", "--quiet", "-m", "dotfiles", cwd=work)
    return publish_work(server, work, name)


def publish_work(server: GitServer, work: Path, name: str) -> str:
    """Serve the repository in ``work`` as ``name``; its URL."""
    publish_bare(work, server.root, name)
    return f"{server.url}/{name}"


def publish_bare(work: Path, root: Path, name: str) -> None:
    bare = root / name
    git("clone", "--quiet", "--bare", str(work), str(bare))
    git("config", "uploadpack.allowFilter", "true", cwd=bare)
    git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=bare)
    git("update-server-info", cwd=bare)


@contextmanager
def serving(base: Path) -> Iterator[GitServer]:
    """Serve the bare repositories of ``base/repositories`` (made here, empty) until the block ends; ``publish``
    makes its work trees under ``base/work``."""
    root = base / "repositories"
    root.mkdir()
    server = _Server(root)
    thread = threading.Thread(target=server.serve_forever, name="git-server", daemon=True)
    thread.start()
    try:
        yield GitServer(url=f"http://127.0.0.1:{server.server_address[1]}", root=root)
    finally:
        server.shutdown()
        server.server_close()
