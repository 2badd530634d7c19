"""The management plane in a process of its own, as ``devyard server`` would run it, for one benchmark run.

It runs ``devyard.server.app.serve`` with default settings but for where it listens and keeps its state, at
log level ``warning`` (its log goes to a file whose warnings the report counts). With ``profile_to`` it runs
under cProfile and writes the statistics there when it stops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from support import network

__all__ = ["ServerProcess", "running_server"]

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0

_PROGRAM = """
import json, sys
from devyard.server.app import serve
from devyard.server.settings import ServerSettings

settings = ServerSettings(**json.loads(sys.argv[1]))
if sys.argv[2]:
    import cProfile

    profiler = cProfile.Profile()
    try:
        profiler.runcall(serve, settings, log_level="warning")
    finally:
        profiler.dump_stats(sys.argv[2])
else:
    serve(settings, log_level="warning")
"""


@dataclass(frozen=True)
class ServerProcess:
    url: str
    admin_token: str
    pid: int
    log_path: Path


@contextmanager
def running_server(
    state_dir: Path, database: str | None, log_path: Path, *, profile_to: Path | None = None, workers: int = 1
) -> Iterator[ServerProcess]:
    """Start the server on a free port of 127.0.0.1 and wait until it answers; stop it (SIGTERM) on exit."""
    port = network.free_port()
    settings = {"listen": f"127.0.0.1:{port}", "state_dir": str(state_dir), "database": database, "workers": workers}
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DEVYARD_SERVER_")}
    command = [sys.executable, "-c", _PROGRAM, json.dumps(settings), str(profile_to or "")]
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process, log_path)
        token = (state_dir / "admin-token").read_text().strip()
        yield ServerProcess(url, token, process.pid, log_path)
    finally:
        _stop(process)


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    with httpx.Client(base_url=url, timeout=2.0) as http:
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server did not start (exit status {process.poll()}):\n{tail}")
            try:
                if http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
