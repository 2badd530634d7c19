"""The real management plane on a real port, for tests: in a thread of the test process, or in its own process.

Used by the ``server`` fixture in ``tests/conftest.py`` (``serve_in_thread``) and by tests that need more than
one server or a server they can kill (``serve_in_process``, which runs the ``devyard server`` command). Both
yield a ``LiveServer`` that can be stopped and started again on the same port, state directory and database,
for tests such as "a runner survives a server restart".

In a thread, the app is ``devyard.server.app.create_app(settings)`` under ``uvicorn.Server`` with its own event
loop; its lifespan migrates the database, bootstraps the admin (``<state_dir>/admin-token``) and runs the
control loops. Start-up returns once ``/healthz`` answers, which is after the lifespan has started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import uvicorn

from devyard.client import Client
from devyard.server.settings import ServerSettings
from support import network

__all__ = ["LiveServer", "serve_in_process", "serve_in_thread", "settings_for"]

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
#: How long a stopping server lets open requests (a watch stream, say) finish before it cancels them.
_GRACEFUL_SHUTDOWN = 1


def settings_for(state_dir: Path, database: str | None = None, **overrides: Any) -> ServerSettings:
    """Settings for a test server: a free port (chosen when the server starts), ``state_dir``, ``database`` (a
    ``sqlite:///`` or ``postgresql://`` URL; default SQLite in the state directory) and fast control loops."""
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "state_dir": state_dir,
        "database": database,
        "loop_interval": 0.2,
        **overrides,
    }
    return ServerSettings(**values)


class _Backend(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...

    @property
    def running(self) -> bool: ...


@dataclass
class LiveServer:
    """A running management plane. ``stop()`` and ``start()`` keep its port, state directory and database.

    ``admin_token`` is read from ``<state_dir>/admin-token``, which the server writes when it bootstraps an
    empty database; it is ``""`` for a replica that shares an already bootstrapped database but not the
    state directory. (Replicas must share the secret key too: the state directory, or ``secret_key``.)
    """

    url: str
    state_dir: Path
    admin_token: str
    settings: ServerSettings
    _backend: _Backend = field(repr=False)

    @property
    def running(self) -> bool:
        return self._backend.running

    def stop(self) -> None:
        """Stop the server (graceful: the lifespan's shutdown runs); a no-op when stopped."""
        self._backend.stop()

    def start(self) -> None:
        """Start the stopped server again and wait until it answers."""
        if not self._backend.running:
            self._backend.start()

    def kill(self) -> None:
        """Stop the server without its graceful shutdown, as in a crash: a child process gets SIGKILL; in a
        thread, the lifespan's shutdown is skipped and the event loop's tasks are cancelled."""
        self._backend.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, token: str | None = None, **options: Any) -> Client:
        """A blocking API client, with the admin's token unless ``token`` is given; the caller closes it."""
        return Client(self.url, self.admin_token if token is None else token, **options)


@contextmanager
def serve_in_thread(settings: ServerSettings) -> Iterator[LiveServer]:
    """Run the app in a thread of this process; on exit stop it. Port 0 in ``settings.listen`` means a free
    port, and ``public_url`` defaults to the server's URL."""
    with _listening(settings) as (settings, first_socket):
        backend = _ThreadBackend(settings, first_socket)
        with _started(settings, backend) as live:
            yield live


@contextmanager
def serve_in_process(settings: ServerSettings) -> Iterator[LiveServer]:
    """Run ``devyard server`` in a child process; on exit stop it (SIGTERM). Port 0 in ``settings.listen``
    means a free port, and ``public_url`` defaults to the server's URL."""
    port = settings.host_port()[1] or network.free_port()
    settings = _with_port(settings, port)
    backend = _ProcessBackend(settings)
    with _started(settings, backend) as live:
        yield live


@contextmanager
def _listening(settings: ServerSettings) -> Iterator[tuple[ServerSettings, socket.socket]]:
    sock = network.listening_socket(settings.host_port()[1])
    try:
        yield _with_port(settings, sock.getsockname()[1]), sock
    finally:
        sock.close()


def _with_port(settings: ServerSettings, port: int) -> ServerSettings:
    settings = settings.model_copy(update={"listen": f"127.0.0.1:{port}"})
    if settings.public_url is None:
        settings = settings.model_copy(update={"public_url": _url(settings)})
    return settings


def _url(settings: ServerSettings) -> str:
    return f"http://127.0.0.1:{settings.host_port()[1]}"


@contextmanager
def _started(settings: ServerSettings, backend: _Backend) -> Iterator[LiveServer]:
    backend.start()
    try:
        token_file = settings.state_dir / "admin-token"
        token = token_file.read_text().strip() if token_file.exists() else ""
        yield LiveServer(_url(settings), settings.state_dir, token, settings, backend)
    finally:
        backend.stop()


def _wait_until_healthy(url: str, alive: Callable[[], bool], what: str) -> None:
    """Poll ``url/healthz`` until it answers 200; fail early when ``alive()`` turns false."""
    deadline = time.monotonic() + _START_TIMEOUT
    with httpx.Client(base_url=url, timeout=2.0) as http:
        while True:
            if not alive():
                raise RuntimeError(f"{what} exited during start-up; its log is above")
            try:
                if http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer {url}/healthz within {_START_TIMEOUT:.0f} s")
            time.sleep(0.02)


class _ThreadBackend:
    """uvicorn in a daemon thread with its own event loop, serving on a socket bound beforehand (no port race;
    a restart binds the same port again)."""

    def __init__(self, settings: ServerSettings, first_socket: socket.socket) -> None:
        self._settings = settings
        self._socket: socket.socket | None = first_socket
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        # Imported here so that a broken app fails the tests that start a server, not the collection.
        from devyard.server.app import create_app

        host, port = self._settings.host_port()
        sock = self._socket or network.listening_socket(port)
        self._socket = None
        config = uvicorn.Config(
            create_app(self._settings),
            host=host,
            port=port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN,
        )
        server = uvicorn.Server(config)
        # uvicorn closes the socket on shutdown; after a failed start-up we do.
        thread = threading.Thread(target=_run_closing, args=(server, sock), name=f"devyard-server-{port}", daemon=True)
        self._server, self._thread = server, thread
        thread.start()
        try:
            _wait_until_healthy(_url(self._settings), thread.is_alive, "the server thread")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._shut_down(force=False)

    def kill(self) -> None:
        self._shut_down(force=True)

    def _shut_down(self, *, force: bool) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.force_exit = force
        server.should_exit = True
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            # The lifespan's shutdown hangs: skip it, so that the test fails instead of the whole run hanging.
            server.force_exit = True
            thread.join(5.0)
        self._server = self._thread = None
        if thread.is_alive():
            raise RuntimeError(f"the server thread did not stop within {_STOP_TIMEOUT:.0f} s")


def _run_closing(server: uvicorn.Server, sock: socket.socket) -> None:
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class _ProcessBackend:
    """``python -m devyard server --listen ... --state-dir ... --database ...`` with the other settings in
    ``DEVYARD_SERVER_*`` variables. Its output goes to the test's captured stderr."""

    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        settings = self._settings
        command = [sys.executable, "-m", "devyard", "server", "--listen", settings.listen]
        command += ["--state-dir", str(settings.state_dir)]
        if settings.database is not None:
            command += ["--database", settings.database]
        return command

    def environment(self) -> dict[str, str]:
        environment = {key: value for key, value in os.environ.items() if not key.startswith("DEVYARD_SERVER_")}
        for name, value in self._settings.model_dump(mode="json").items():
            if value is not None:
                environment[f"DEVYARD_SERVER_{name.upper()}"] = str(value)
        return environment

    def start(self) -> None:
        process = subprocess.Popen(self.command(), env=self.environment(), stdin=subprocess.DEVNULL)
        self.process = process
        try:
            _wait_until_healthy(
                _url(self._settings), lambda: process.poll() is None, f"devyard server (pid {process.pid})"
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError(
                f"devyard server (pid {process.pid}) ignored SIGTERM for {_STOP_TIMEOUT:.0f} s"
            ) from None

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
