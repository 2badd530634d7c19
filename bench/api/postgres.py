"""A fresh PostgreSQL cluster for one benchmark run, configured for durability as in production.

Unlike the test fixture (``tests/support/postgres.py``, whose binary lookup and port picking this reuses), the
cluster keeps PostgreSQL's durable defaults, written out so the report can show them: ``fsync``,
``synchronous_commit`` and ``full_page_writes`` on, so every commit waits for its WAL to reach the disk.
PostgreSQL refuses to run as root, so under root ``initdb`` and ``postgres`` run as the ``postgres`` OS user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import network
from support import postgres as test_postgres

__all__ = ["DURABLE_SETTINGS", "Cluster", "durable_cluster"]

_SUPERUSER = "postgres"
_DATABASE = "devyard"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0

#: What ``postgres`` is started with besides where to listen: durability as shipped, a little more memory.
DURABLE_SETTINGS: Mapping[str, str] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "256MB",
    "max_connections": "100",
    "log_min_messages": "warning",
}


@dataclass(frozen=True)
class Cluster:
    #: ``postgresql://postgres@127.0.0.1:PORT/devyard``, for ``ServerSettings.database``.
    url: str
    directory: Path
    #: The postmaster's pid: its backends are its children, which ``cpu`` counts with it.
    pid: int
    version: str


@contextmanager
def durable_cluster() -> Iterator[Cluster]:
    """initdb into a new temporary directory, start the server, create the ``devyard`` database; on exit stop
    the server (fast shutdown) and remove the directory."""
    bindir = test_postgres.find_bindir()
    as_user = _user_options()
    directory = Path(tempfile.mkdtemp(prefix="devyard-bench-pg-"))
    try:
        if as_user:
            entry = pwd.getpwnam(_SUPERUSER)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        data = directory / "data"
        port = network.free_port()
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", _SUPERUSER, "-A", "trust", "-E", "UTF8"]
        _run([*initdb, "--no-locale"], directory, as_user)
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": str(directory),
            **DURABLE_SETTINGS,
        }
        arguments = [arg for key, value in options.items() for arg in ("-c", f"{key}={value}")]
        log_path = directory / "postgres.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), *arguments],
                cwd=directory,
                env=_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **as_user,
            )
        try:
            _wait_ready(bindir, port, process, log_path)
            psql = [str(bindir / "psql"), "-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-p", str(port)]
            psql += ["-U", _SUPERUSER, "-d", "postgres", "-v", "ON_ERROR_STOP=1"]
            _run([*psql, "-c", f"CREATE DATABASE {_DATABASE}"], directory, {})
            version = _run([*psql, "-c", "SHOW server_version"], directory, {}).strip()
            yield Cluster(f"postgresql://{_SUPERUSER}@127.0.0.1:{port}/{_DATABASE}", directory, process.pid, version)
        finally:
            _stop(process)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _user_options() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(_SUPERUSER)
    except KeyError:
        raise test_postgres.PostgresUnavailable(
            f"running as root and there is no {_SUPERUSER!r} OS user to run PostgreSQL as (run scripts/setup)"
        ) from None
    return {"user": _SUPERUSER, "group": _SUPERUSER, "extra_groups": []}


def _environment() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}


def _run(command: list[str], cwd: Path, user_options: dict[str, Any]) -> str:
    result = subprocess.run(
        command,
        cwd=cwd,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        **user_options,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


def _wait_ready(bindir: Path, port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    isready = [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
    deadline = time.monotonic() + _START_TIMEOUT
    while subprocess.run(isready, check=False, timeout=10).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"postgres did not start (exit status {process.poll()}):\n{tail}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # fast shutdown
    try:
        process.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
