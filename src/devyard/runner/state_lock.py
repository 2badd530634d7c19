"""The runner's lock on its state directory: ``<state_dir>/runner.lock``, an ``flock`` held while a process acts
on the host's containers, with the holder's pid written in it.

The agent holds it for as long as it runs a linux runtime (two runners on one state directory would fight over
the same containers); ``devyard runner doctor --fix`` takes it for the time of its repairs, and refuses to fix
when it cannot, while ``doctor`` without ``--fix`` only asks who holds it. The kernel drops an ``flock`` when its
holder dies, so a runner killed with SIGKILL leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import IO

__all__ = ["hold", "holder", "lock_path"]


def lock_path(state_dir: Path) -> Path:
    return state_dir / "runner.lock"


def hold(state_dir: Path) -> IO[str] | None:
    """Take the lock for this process and write its pid; None when another process holds it.

    Keep the returned file open for as long as the lock is needed: closing it (or dying) releases it.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path(state_dir), "a+")  # noqa: SIM115 - held open for as long as the lock is
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


def holder(state_dir: Path) -> int | None:
    """The pid of the process holding the lock, or None when nobody does (0 when one does but its pid is not
    written yet)."""
    try:
        handle = open(lock_path(state_dir))  # noqa: SIM115 - closed below on every path
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            # Held. The holder writes its pid right after taking the lock: give it a moment.
            for _ in range(50):
                handle.seek(0)
                text = handle.read().strip()
                if text.isdigit():
                    return int(text)
                time.sleep(0.01)
            return 0
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None
