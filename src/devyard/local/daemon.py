"""The local daemon's process: the management plane (SQLite) and an embedded runner in one event loop.

``python -m devyard.local --state-dir DIR [--port N]`` runs ``run_daemon`` until SIGTERM or SIGINT; ``lifecycle``
spawns it. In order, it:

1. takes the state directory's pid lock (a second daemon there exits at once);
2. binds 127.0.0.1 on ``--port``, else the port of its previous run, else a free one, and serves the app on
   that socket (the app's lifespan migrates the database and writes the admin token to ``server/admin-token``);
3. as the admin, through the API: registers its runner unless the runner already has a credential the
   server still knows (``POST /runners``, whose exchange token the agent trades for a credential), and makes
   an environment class that runner offers unless one exists;
4. starts the runner's agent (the linux runtime as root, else the fake one; its gateway on 127.0.0.1 and a free
   port; environments without an image get ``LOCAL_IMAGE``) against its own URL and writes ``daemon.json``:
   ready.

On a signal it stops the agent (containers stay as they are), then the server, and releases the lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from devyard.client import ApiError, AsyncClient
from devyard.local.state_dir import DaemonInfo, StateDir
from devyard.runner import credentials
from devyard.runner.agent import Agent
from devyard.runner.errors import CredentialError
from devyard.runner.host_process import watch_children_by_pidfd
from devyard.runner.settings import RunnerSettings, default_runtime
from devyard.server.app import create_app
from devyard.server.settings import ServerSettings

__all__ = ["main", "run_daemon"]

log = logging.getLogger("devyard.local")

#: The name of the runner and of the environment class the daemon makes.
LOCAL_NAME = "local"
#: The image of environments that name none (and have no dev container): built from Debian's mirror on first
#: use, so that `devyard up` needs no container registry.
LOCAL_IMAGE = "devyard.local/debian:bookworm"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon decides when the server stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_daemon(state: StateDir, port: int = 0, runtime: str | None = None) -> int:
    """Run until a signal; the exit status (0 after a clean stop). ``runtime``: the embedded runner's (None: its
    default, ``linux`` as root on Linux)."""
    pid_lock = state.hold_pid_lock()
    if pid_lock is None:
        log.error("another devyard daemon is running in %s (pid %s)", state.root, state.live_pid())
        return 1
    try:
        return await _serve(state, port, runtime or default_runtime())
    finally:
        pid_lock.close()


async def _serve(state: StateDir, port: int, runtime: str) -> int:
    watch_children_by_pidfd()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stopping.set)

    sock = _bind(port, state.previous_port())
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    for directory in (state.server_dir, state.runner_dir):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings = ServerSettings(listen=f"127.0.0.1:{port}", state_dir=state.server_dir, public_url=url)
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = _EmbeddedServer(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="server")
    agent: Agent | None = None
    running: asyncio.Task[None] | None = None
    try:
        await _until_started(server, serving, stopping)
        if stopping.is_set():
            return 0
        log.info("server listening at %s", url)
        admin_token = state.read_admin_token()
        if admin_token is None:
            raise SystemExit(f"the server wrote no admin token to {state.server_dir / 'admin-token'}")
        # The gateway on loopback, on any free port: `devyard env exec` reaches it at the URL the runner reports.
        runner_settings = RunnerSettings(
            server=url,
            state_dir=state.runner_dir,
            runtime=runtime,
            gateway_listen="127.0.0.1:0",
            default_image=LOCAL_IMAGE,
            desktop=True,
            ssh_listen="127.0.0.1:0",
            # Ports at http://PORT-ID.localhost:P/: browsers and curl resolve *.localhost to the loopback.
            ports_listen="127.0.0.1:0",
            ports_domain="localhost",
        )
        async with AsyncClient(url, admin_token) as client:
            runner_id, exchange_token = await _ensure_runner(client, runner_settings.credential_path())
            await _ensure_class(client, runner_id)
        runner_settings = runner_settings.model_copy(update={"exchange_token": exchange_token})
        agent = Agent(runner_settings)
        running = asyncio.create_task(agent.run(), name="runner")
        state.write_info(
            DaemonInfo(
                pid=os.getpid(), url=url, port=port, runner_id=runner_id, started_at=time.time(), runtime=runtime
            )
        )
        log.info("ready: runner %s, state in %s", runner_id, state.root)
        waiting = asyncio.create_task(stopping.wait())
        done, _ = await asyncio.wait({waiting, serving, running}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if serving in done:
            log.error("the server stopped on its own")
            return 1
        if running in done:
            _log_outcome(running)
            return 1
        log.info("stopping")
        return 0
    finally:
        if agent is not None and running is not None:
            agent.stop()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(running), _STOP_TIMEOUT)
        server.should_exit = True
        try:
            await asyncio.wait_for(serving, _STOP_TIMEOUT)
        except TimeoutError:
            log.warning("the server did not stop within %.0fs", _STOP_TIMEOUT)
        except (Exception, asyncio.CancelledError):  # already logged by uvicorn or by the code above
            pass
        log.info("stopped")


def _bind(port: int, previous: int | None) -> socket.socket:
    """A listening socket on 127.0.0.1: ``port``, else the previous run's port if free, else a free one."""
    candidates = [port] if port else [*([previous] if previous else []), 0]
    for index, candidate in enumerate(candidates):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", candidate))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE and index + 1 < len(candidates):
                continue
            raise SystemExit(f"cannot listen on 127.0.0.1:{candidate}: {exc.strerror}") from None
        sock.listen(2048)
        sock.setblocking(False)
        return sock
    raise AssertionError("unreachable")


async def _until_started(server: uvicorn.Server, serving: asyncio.Task[None], stopping: asyncio.Event) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while not server.started:
        if serving.done():
            serving.result()  # raises what stopped it
            raise SystemExit("the server stopped while starting")
        if stopping.is_set():
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not start within {_START_TIMEOUT:.0f}s")
        await asyncio.sleep(0.05)


async def _ensure_runner(client: AsyncClient, credential_path: Path) -> tuple[str, str | None]:
    """The embedded runner's id, and an exchange token when it must register (None: it has a credential)."""
    try:
        stored = credentials.load(credential_path)
    except CredentialError as exc:
        log.warning("%s; registering the runner again", exc)
        stored = None
    if stored is not None:
        try:
            await client.get(f"/api/v1/runners/{stored.runner_id}")
            return stored.runner_id, None
        except ApiError as exc:
            if not exc.is_not_found:
                raise
        log.warning("the server no longer knows runner %s; registering the runner again", stored.runner_id)
        await asyncio.to_thread(credential_path.unlink, missing_ok=True)
    body: dict[str, Any] = {"metadata": {"name": LOCAL_NAME}, "spec": {"description": "the local daemon's runner"}}
    try:
        created = await client.post("/api/v1/runners", body)
    except ApiError as exc:
        if not exc.is_conflict:
            raise
        del body["metadata"]  # the name is taken by an older registration: let the server pick one
        created = await client.post("/api/v1/runners", body)
    runner_id = str(created["runner"]["metadata"]["id"])
    log.info("registered runner %s", runner_id)
    return runner_id, str(created["exchange_token"])


async def _ensure_class(client: AsyncClient, runner_id: str) -> None:
    """Make sure some enabled environment class is offered by the runner, and is the default if none is."""
    classes, _ = await client.list_all("/api/v1/environment-classes")
    offered = [
        c
        for c in classes
        if c["spec"].get("enabled", True) and runner_id in (c["spec"].get("runner_ids") or [runner_id])
    ]
    if offered:
        return
    mine = [c for c in classes if c["metadata"]["name"] == LOCAL_NAME]
    if mine:
        # The class of an earlier registration of this daemon's runner: move it to the new one.
        await client.patch(
            f"/api/v1/environment-classes/{mine[0]['metadata']['id']}",
            {"spec": {"runner_ids": [runner_id], "enabled": True}},
        )
        return
    spec = {
        "display_name": "This machine",
        "description": "Environments on the machine that runs `devyard up`",
        "cpu": float(os.cpu_count() or 2),
        "memory_mib": _memory_mib(),
        "runner_ids": [runner_id],
        "default": not any(c["spec"].get("default") for c in classes),
    }
    created = await client.post("/api/v1/environment-classes", {"metadata": {"name": LOCAL_NAME}, "spec": spec})
    log.info("created environment class %s", created["metadata"]["id"])


def _memory_mib() -> int:
    try:
        return max(1, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024))
    except (ValueError, OSError):
        return 4096


def _log_outcome(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        log.error("the runner was cancelled")
    elif task.exception() is not None:
        log.error("the runner stopped: %s", task.exception())
    else:
        log.error("the runner stopped on its own")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devyard.local", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0, help="0: the previous run's port if free, else any")
    parser.add_argument("--runtime", choices=("linux", "fake"), help="the runner's runtime; default: linux as root")
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("DEVYARD_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request drowns what matters
    raise SystemExit(asyncio.run(run_daemon(StateDir(options.state_dir.resolve()), options.port, options.runtime)))
