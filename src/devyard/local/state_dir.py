"""The local daemon's state directory: where each file is, the pid lock, and the daemon's ready record.

Used by both sides: the daemon writes, ``lifecycle`` (in the CLI's process) reads. Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["DaemonInfo", "StateDir", "default_state_dir"]


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/devyard`` (``~/.local/state/devyard``); as root ``/var/lib/devyard/local``: the linux
    runtime's containers reach their bundles as an unprivileged user, and root's home is closed to others."""
    if os.environ.get("XDG_STATE_HOME"):
        return Path(os.environ["XDG_STATE_HOME"]) / "devyard"
    if os.geteuid() == 0:
        return Path("/var/lib/devyard/local")
    return Path.home() / ".local" / "state" / "devyard"


@dataclass(frozen=True)
class DaemonInfo:
    """What a daemon says about itself once it is ready to serve (``daemon.json``)."""

    pid: int
    url: str
    port: int
    runner_id: str
    started_at: float
    #: The embedded runner's runtime: ``linux`` or ``fake``.
    runtime: str = "fake"

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DaemonInfo:
        return cls(
            pid=int(raw["pid"]),
            url=str(raw["url"]),
            port=int(raw["port"]),
            runner_id=str(raw["runner_id"]),
            started_at=float(raw["started_at"]),
            runtime=str(raw.get("runtime", "fake")),
        )


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def pid_file(self) -> Path:
        return self.root / "daemon.pid"

    @property
    def info_file(self) -> Path:
        return self.root / "daemon.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def log_file(self) -> Path:
        return self.root / "daemon.log"

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    @property
    def runner_dir(self) -> Path:
        return self.root / "runner"

    def create(self) -> None:
        # Searchable by others (not readable): the runner's containers reach their bundles below it as an
        # unprivileged id. The server's directory and the files that matter are private on their own.
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)

    # The pid lock: held by the living daemon.

    def hold_pid_lock(self) -> IO[str] | None:
        """Take the pid lock for this process and write its pid; None when another daemon holds it.

        Keep the returned file open for as long as the daemon lives: closing it (or dying) releases the lock.
        """
        self.create()
        handle = open(self.pid_file, "a+")  # noqa: SIM115 - held open for the daemon's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle

    def live_pid(self) -> int | None:
        """The pid of the daemon that holds the pid lock, or None when no daemon lives here."""
        try:
            handle = open(self.pid_file)  # noqa: SIM115 - closed below on every path
        except FileNotFoundError:
            return None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                # Held: a daemon lives. It writes its pid right after taking the lock, so wait a moment for it.
                for _ in range(50):
                    handle.seek(0)
                    text = handle.read().strip()
                    if text.isdigit():
                        return int(text)
                    time.sleep(0.01)
                return None
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None

    # The ready record.

    def write_info(self, info: DaemonInfo) -> None:
        _write_private(self.info_file, json.dumps(asdict(info), indent=2) + "\n")

    def read_info(self) -> DaemonInfo | None:
        try:
            return DaemonInfo.from_json(json.loads(self.info_file.read_text()))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def previous_port(self) -> int | None:
        info = self.read_info()
        return info.port if info is not None else None

    def read_admin_token(self) -> str | None:
        """The local admin's token, which the server writes into its state directory on first start."""
        try:
            return (self.server_dir / "admin-token").read_text().strip() or None
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def operation_lock(self, timeout: float) -> Iterator[None]:
        """Held by ``up`` and ``down`` while they start or stop the daemon; waits up to ``timeout`` for it."""
        self.create()
        with open(self.lock_file, "a") as handle:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"another devyard command is starting or stopping {self.root}") from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically into a file only its owner can read."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
