"""Start, find and stop the local daemon from another process; ``devyard up`` and ``devyard down`` call these.

A daemon is reused when one holds the state directory's pid lock and answers ``/healthz`` at the URL its
``daemon.json`` names; otherwise ``ensure_daemon`` spawns ``python -m devyard.local`` detached (its own
session, output to ``daemon.log``) and waits until it is ready or dies. Standard library only, so that
``up`` pays for nothing it does not use.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from devyard.local.state_dir import DaemonInfo, StateDir

__all__ = ["DaemonError", "ensure_daemon", "find_daemon", "last_log_line", "stop_daemon"]

_POLL = 0.1


class DaemonError(Exception):
    """The daemon could not be started or stopped; the message says why and where its log is."""


def find_daemon(state: StateDir) -> DaemonInfo | None:
    """The running, ready daemon of ``state``, or None."""
    pid = state.live_pid()
    info = state.read_info()
    if pid is None or info is None or info.pid != pid or not _healthy(info.url):
        return None
    return info


def ensure_daemon(
    state: StateDir,
    *,
    port: int = 0,
    runtime: str | None = None,
    timeout: float = 60.0,
    on_progress: Callable[[str], None] = lambda _: None,
) -> tuple[DaemonInfo, bool]:
    """A ready daemon, and whether this call started it. ``port`` 0 picks the previous port, or a free one;
    ``runtime`` (``linux`` or ``fake``; None: the runner's default) applies to a daemon this call starts."""
    state.create()
    try:
        with state.operation_lock(timeout):
            info = find_daemon(state)
            if info is not None:
                return info, False
            process = None
            if state.live_pid() is None:
                on_progress("Starting the local daemon")
                process = _spawn(state, port, runtime)
            else:
                on_progress("Waiting for the local daemon to be ready")
            return _wait_ready(state, process, timeout), process is not None
    except TimeoutError as exc:
        raise DaemonError(str(exc)) from None


def stop_daemon(state: StateDir, *, timeout: float = 20.0) -> int | None:
    """Stop the daemon (SIGTERM, then SIGKILL after ``timeout``); its pid, or None when none was running."""
    if not state.root.is_dir():
        return None
    try:
        with state.operation_lock(timeout):
            pid = state.live_pid()
            if pid is None:
                state.pid_file.unlink(missing_ok=True)
                return None
            _signal(pid, signal.SIGTERM)
            if not _wait_released(state, timeout):
                _signal(pid, signal.SIGKILL)
                if not _wait_released(state, 5.0):
                    raise DaemonError(f"the local daemon (pid {pid}) does not stop; see {state.log_file}")
            _wait_gone(pid, 5.0)
            state.pid_file.unlink(missing_ok=True)
            return pid
    except TimeoutError as exc:
        raise DaemonError(str(exc)) from None


def last_log_line(state: StateDir) -> str:
    """The last non-empty line of the daemon's log, for error messages."""
    try:
        with open(state.log_file, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 8192))
            lines = [line.strip() for line in stream.read().decode(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return ""
    return lines[-1] if lines else ""


def _spawn(state: StateDir, port: int, runtime: str | None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "devyard.local", "--state-dir", str(state.root), "--port", str(port)]
    if runtime is not None:
        command += ["--runtime", runtime]
    with open(state.log_file, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n".encode())
        log.flush()
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal that ran `up` must not reach the daemon
            close_fds=True,
            cwd="/",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _wait_ready(state: StateDir, process: subprocess.Popen[bytes] | None, timeout: float) -> DaemonInfo:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = find_daemon(state)
        if info is not None:
            return info
        if process is not None and process.poll() is not None:
            detail = last_log_line(state)
            raise DaemonError(
                f"the local daemon exited with code {process.returncode} while starting"
                + (f": {detail}" if detail else "")
                + f" (log: {state.log_file})"
            )
        if process is None and state.live_pid() is None:
            raise DaemonError(f"the local daemon stopped while starting (log: {state.log_file})")
        time.sleep(_POLL)
    raise DaemonError(f"the local daemon is not ready after {timeout:g}s (log: {state.log_file})")


#: The daemon is on the loopback interface: no proxy from the environment may stand in between.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(url: str) -> bool:
    try:
        with _DIRECT.open(f"{url}/healthz", timeout=2.0) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_released(state: StateDir, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.live_pid() is None:
            return True
        time.sleep(_POLL)
    return False


def _wait_gone(pid: int, timeout: float) -> None:
    """The lock is released a moment before the process is gone; wait for that too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(_POLL / 2)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
