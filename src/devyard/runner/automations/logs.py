"""The output of automations, kept on the runner: one log file per automation, read from an offset or followed.

The executor writes each automation's output to ``<log_root>/<environment_id>/automations/<id>.log`` through a
``LogWriter`` (a header line per run, then everything the run prints); whoever serves logs to users (the gateway,
``devyard env logs``) calls ``read_log`` and ``follow_log``.

A log is capped: once it grows past its limit it is cut to its newest half (written beside it, then renamed over
it, so a reader never sees half a file). Offsets are byte positions in the file as it is now; ``follow_log`` notices
a cut (the file was replaced) and goes on from the start of the new file, so a follower may see a stretch twice
but never loses the newest output.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from devyard.runner.atomic_file import write_atomically

__all__ = ["DEFAULT_LOG_LIMIT", "LogChunk", "LogWriter", "follow_log", "log_path", "read_log"]

#: Bytes a log may hold before it is cut to its newest half.
DEFAULT_LOG_LIMIT: Final = 1024 * 1024
#: Bytes ``read_log`` returns at most at once.
_READ_SIZE: Final = 64 * 1024


def log_path(log_root: Path, environment_id: str, automation_id: str) -> Path:
    return log_root / environment_id / "automations" / f"{automation_id}.log"


@dataclass(frozen=True)
class LogChunk:
    data: bytes
    #: Where to read next.
    next_offset: int


class LogWriter:
    """Appends to one automation's log, keeping it under ``limit`` bytes. Writes are small appends to a local
    file, done in the loop; cutting the file, which reads and writes up to ``limit`` bytes, runs in a thread."""

    def __init__(self, path: Path, *, limit: int = DEFAULT_LOG_LIMIT) -> None:
        self.path = path
        self.limit = limit
        self._lock = asyncio.Lock()

    async def write(self, data: bytes) -> None:
        if not data:
            return
        async with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab", buffering=0) as file:
                file.write(data)
                size = file.tell()
            if size > self.limit:
                await asyncio.to_thread(_keep_tail, self.path, self.limit // 2)

    async def line(self, text: str) -> None:
        """A line of devyard's own, told apart from the automation's output by its ``[devyard]`` prefix."""
        await self.write(f"[devyard] {text}\n".encode())


def _keep_tail(path: Path, size: int) -> None:
    with path.open("rb") as file:
        file.seek(0, os.SEEK_END)
        end = file.tell()
        file.seek(max(0, end - size))
        tail = file.read()
    # Start at a line, so the log does not open with half of one.
    newline = tail.find(b"\n")
    if 0 <= newline < len(tail) - 1:
        tail = tail[newline + 1 :]
    write_atomically(path, b"[devyard] (older output dropped: the log is capped)\n" + tail)


def _read(path: Path, offset: int, size: int) -> tuple[bytes, int] | None:
    """Up to ``size`` bytes from ``offset`` and the file's inode; None when there is no file."""
    try:
        with path.open("rb") as file:
            end = os.fstat(file.fileno()).st_size
            file.seek(min(offset, end))
            return file.read(size), os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return None


async def read_log(path: Path, offset: int = 0, *, size: int = _READ_SIZE) -> LogChunk:
    """Up to ``size`` bytes of the log from ``offset``; nothing (and the same offset) past its end or while it
    does not exist. An offset beyond a log that was cut reads nothing until the log grows back past it: a
    follower should use ``follow_log``, which notices cuts."""
    found = await asyncio.to_thread(_read, path, offset, size)
    if found is None:
        return LogChunk(b"", offset)
    data, _ = found
    return LogChunk(data, offset + len(data))


async def follow_log(
    path: Path,
    offset: int = 0,
    *,
    finished: Callable[[], bool] = lambda: False,
    poll_interval: float = 0.2,
) -> AsyncIterator[bytes]:
    """The log's output from ``offset`` as it is written, until ``finished()`` holds and everything written
    before it held was given (the caller may also just stop iterating)."""
    inode: int | None = None
    while True:
        done = finished()  # asked before reading: what was written before it held is read below
        found = await asyncio.to_thread(_read, path, offset, _READ_SIZE)
        if found is not None:
            data, current = found
            if inode is not None and current != inode:
                # The log was cut (a new file): go on from its start.
                offset, inode = 0, current
                continue
            inode = current
            if data:
                offset += len(data)
                yield data
                continue
        if done:
            return
        await asyncio.sleep(poll_interval)
