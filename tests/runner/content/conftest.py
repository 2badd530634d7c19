"""A real git server on 127.0.0.1 for the content tests: Debian's ``git http-backend`` run as a CGI program by
a small HTTP server, with basic auth on ``private.git``, and the repositories it serves."""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
USERNAME = "alice"
PASSWORD = "s3cret-token-0f9e8d"
#: A branch name with slashes, as people name them.
DEEP_BRANCH = "feature/deep/branch"


@dataclass(frozen=True)
class GitServer:
    url: str
    root: Path
    #: Commits of ``app.git``: the first (only on main's history), main's tip, the deep branch's tip, the tag's.
    first: str
    main: str
    branch: str
    tag: str


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


def _commit(work: Path, name: str, text: str) -> str:
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
    _publish(work, server.root, name)
    return f"{server.url}/{name}"


def _publish(work: Path, root: Path, name: str) -> None:
    bare = root / name
    git("clone", "--quiet", "--bare", str(work), str(bare))
    git("config", "uploadpack.allowFilter", "true", cwd=bare)
    git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=bare)
    git("update-server-info", cwd=bare)


@pytest.fixture(scope="session")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    """``app.git`` (main, a deep branch, a tag, a commit on no branch's tip), ``private.git`` (basic auth:
    ``alice`` and ``PASSWORD``), ``lib.git`` and ``super.git`` (with ``lib`` as a submodule)."""
    base = tmp_path_factory.mktemp("git-server")
    root = base / "repositories"
    root.mkdir()
    server = _Server(root)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="git-server", daemon=True)
    thread.start()

    try:
        yield _build(base, root, url)
    finally:
        server.shutdown()
        server.server_close()


def _build(base: Path, root: Path, url: str) -> GitServer:
    app = base / "app"
    git("init", "--quiet", "--initial-branch=main", str(app))
    first = _commit(app, "README.md", "first")
    tag = _commit(app, "VERSION", "1")
    git("tag", "-a", "v1", "-m", "release 1", cwd=app)
    git("checkout", "--quiet", "-b", DEEP_BRANCH, cwd=app)
    branch = _commit(app, "feature.txt", "on the branch")
    git("checkout", "--quiet", "main", cwd=app)
    _commit(app, "VERSION", "2")
    main = _commit(app, "big/data.txt", "x" * 10_000)
    _publish(app, root, "app.git")

    private = base / "private"
    git("init", "--quiet", "--initial-branch=main", str(private))
    _commit(private, "SECRET_PLANS.md", "private")
    _publish(private, root, "private.git")

    lib = base / "lib"
    git("init", "--quiet", "--initial-branch=main", str(lib))
    _commit(lib, "lib.txt", "the library")
    _publish(lib, root, "lib.git")

    outer = base / "super"
    git("init", "--quiet", "--initial-branch=main", str(outer))
    _commit(outer, "main.txt", "the application")
    git("-c", "protocol.file.allow=always", "submodule", "--quiet", "add", f"{url}/lib.git", "lib", cwd=outer)
    git("commit", "--quiet", "-m", "lib as a submodule", cwd=outer)
    _publish(outer, root, "super.git")

    return GitServer(url=url, root=root, first=first, main=main, branch=branch, tag=tag)
