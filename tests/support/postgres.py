"""A throwaway PostgreSQL server for one test session, and a fresh database for each test.

Used by ``tests/conftest.py``: its session fixture ``postgres_server`` calls ``running_postgres()`` the first time
a test asks for a PostgreSQL database (a session that never does never starts a server), and ``database_url``
takes a new database from ``PostgresServer.database()`` for each test.

The server is real: ``initdb`` into a temporary directory, then ``postgres`` as a child process listening on
127.0.0.1 at a free port and on a unix socket in that directory, trusting every local connection, with
durability off (fsync, synchronous_commit, full_page_writes) because nothing outlives the session. PostgreSQL
refuses to run as root, so under root both run as the ``postgres`` OS user, which owns the directory.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import network

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bindir", "running_postgres"]

_SUPERUSER = "postgres"
_START_TIMEOUT = 60.0


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed (``scripts/setup`` installs them)."""


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``: ``$DEVYARD_TEST_POSTGRES_BINDIR`` if set, else
    ``pg_config --bindir``, the newest Debian ``/usr/lib/postgresql/*/bin``, or ``PATH``."""
    chosen = os.environ.get("DEVYARD_TEST_POSTGRES_BINDIR")
    candidates = [Path(chosen)] if chosen else _bindir_candidates()
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise PostgresUnavailable(
        f"PostgreSQL server binaries (initdb, postgres) not found in {', '.join(map(str, candidates)) or 'PATH'}; "
        "run scripts/setup (it installs Debian's postgresql package) or set DEVYARD_TEST_POSTGRES_BINDIR"
    )


def _bindir_candidates() -> list[Path]:
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        # On Debian pg_config may come from libpq-dev alone; its bindir then has no server.
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    versions = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    candidates += sorted(versions, key=_debian_version, reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    return candidates


@dataclass
class PostgresServer:
    """A running server. ``database()`` makes a fresh database and drops it afterwards."""

    bindir: Path
    directory: Path
    port: int
    log_path: Path
    #: The postmaster's pid, once it runs (its backends are its children).
    pid: int = 0
    _counter: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    @property
    def socket_dir(self) -> Path:
        return self.directory

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str) -> str:
        """Run one statement as the superuser in the ``postgres`` database and return psql's output."""
        command = [
            str(self.bindir / "psql"),
            *("-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"),
            *("-h", str(self.socket_dir), "-p", str(self.port), "-U", _SUPERUSER, "-d", "postgres"),
            *("-c", statement),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed on {statement!r}: {result.stderr.strip()}")
        return result.stdout

    def create_database(self) -> str:
        """Create an empty database and return its name."""
        name = f"test_{next(self._counter)}"
        self.sql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        # FORCE ends connections a test leaked; without the drop each database keeps ~8 MB until the end.
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    @contextmanager
    def database(self) -> Iterator[str]:
        """A fresh database's URL (``postgresql://postgres@127.0.0.1:PORT/test_N``), dropped on exit."""
        name = self.create_database()
        try:
            yield self.url(name)
        finally:
            self.drop_database(name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextmanager
def running_postgres(bindir: Path | None = None, settings: dict[str, str] | None = None) -> Iterator[PostgresServer]:
    """Start a server from ``bindir`` (default: ``find_bindir()``) in a new temporary directory; stop it and
    remove the directory on exit. ``settings`` override the test tuning (``bench/api`` asks for durability)."""
    bindir = bindir or find_bindir()
    as_user = _user_options()
    directory = Path(tempfile.mkdtemp(prefix="devyard-pg-"))
    try:
        if as_user:
            entry = pwd.getpwnam(_SUPERUSER)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        data = directory / "data"
        server = PostgresServer(bindir, directory, network.free_port(), directory / "postgres.log")
        _run(
            [
                str(bindir / "initdb"),
                *("-D", str(data), "-U", _SUPERUSER, "-A", "trust", "-E", "UTF8"),
                "--no-locale",
                "--no-sync",
            ],
            cwd=directory,
            user_options=as_user,
        )
        process = _start(server, data, as_user, settings or {})
        server.pid = process.pid
        try:
            _wait_ready(server, process)
            yield server
        finally:
            _stop(process)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _debian_version(bindir: Path) -> tuple[int, ...]:
    """``(15,)`` for ``/usr/lib/postgresql/15/bin``, ``(9, 6)`` for ``.../9.6/bin``."""
    return tuple(int(part) for part in bindir.parent.name.split(".") if part.isdigit())


def _user_options() -> dict[str, Any]:
    """Popen's options to run as the ``postgres`` OS user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(_SUPERUSER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no {_SUPERUSER!r} OS user to run PostgreSQL as; "
            "Debian's postgresql package creates it (run scripts/setup)"
        ) from None
    return {"user": _SUPERUSER, "group": _SUPERUSER, "extra_groups": []}


def _environment() -> dict[str, str]:
    # LC_ALL=C: a machine without the caller's locale makes initdb and postgres complain.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}


def _run(command: list[str], *, cwd: Path, user_options: dict[str, Any]) -> None:
    result = subprocess.run(
        command,
        cwd=cwd,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        **user_options,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def _start(
    server: PostgresServer, data: Path, user_options: dict[str, Any], overrides: dict[str, str]
) -> subprocess.Popen[bytes]:
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(server.port),
        "unix_socket_directories": str(server.socket_dir),
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        # Each live server's pool may open 20 connections, and tests run several replicas.
        "max_connections": "300",
        "log_min_messages": "warning",
        **overrides,
    }
    options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
    with server.log_path.open("wb") as log:
        return subprocess.Popen(
            [str(server.bindir / "postgres"), "-D", str(data), *options],
            cwd=server.directory,
            env=_environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            **user_options,
        )


def _wait_ready(server: PostgresServer, process: subprocess.Popen[bytes]) -> None:
    isready = [str(server.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(server.port)]
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"postgres exited with {process.returncode} on start:\n{server.log_tail()}")
        if subprocess.run(isready, check=False).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"postgres not ready after {_START_TIMEOUT:.0f} s:\n{server.log_tail()}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    # Immediate shutdown: no checkpoint, since the data directory is removed next.
    process.send_signal(signal.SIGQUIT)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
