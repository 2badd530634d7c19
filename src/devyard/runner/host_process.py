"""``start_host_process``: a process on this host with its streams attached, as a ``runtime.ExecProcess``.

The fake runtime's ``open_exec`` runs commands this way (a test double: as the runner's own user, in a scratch
directory). Without a TTY the process gets three pipes; with one it gets the slave side of a new pseudo-terminal
as its controlling terminal (a new session), and ``stdout`` reads the master side, so ``resize`` sets the size
that the process sees (and the kernel sends it SIGWINCH).

Output is read through asyncio's stream readers, which stop reading from the pipe or terminal while their buffer
is full: a process that writes faster than the caller reads blocks, instead of filling the runner's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import subprocess
import termios
from collections.abc import Mapping, Sequence
from pathlib import Path

from devyard.runner.errors import PermanentError

__all__ = ["HostProcess", "start_host_process"]

#: How much output a stream buffers before reading from the process pauses.
_STREAM_LIMIT = 64 * 1024


class HostProcess:
    """A started host process; see ``runtime.ExecProcess`` for the contract."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader | None,
        terminal: int | None,
    ) -> None:
        self._process = process
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        #: A descriptor of the pseudo-terminal's master side, to set its size; closed once the process exited.
        self._terminal = terminal

    @property
    def pid(self) -> int:
        return self._process.pid

    async def resize(self, rows: int, columns: int) -> None:
        if self._terminal is None:
            return
        with contextlib.suppress(OSError):  # the terminal closed: the process is gone
            fcntl.ioctl(self._terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    async def signal(self, number: int) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(number)

    async def wait(self) -> int:
        code = await self._process.wait()
        if self._terminal is not None:
            os.close(self._terminal)
            self._terminal = None
        return 128 - code if code < 0 else code


class _TerminalReaderProtocol(asyncio.StreamReaderProtocol):
    """Reading a pseudo-terminal's master after the last process holding the slave exited fails with EIO:
    that is its end of file, not an error."""

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.EIO:
            exc = None
        super().connection_lost(exc)


async def start_host_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    tty: bool,
    size: tuple[int, int] | None = None,
) -> HostProcess:
    """Start ``argv`` with exactly ``env`` in ``cwd``; ``PermanentError`` when it cannot be started."""
    if not argv:
        raise PermanentError("nothing to run: the command is empty")
    if tty:
        return await _start_with_terminal(argv, env, cwd, size)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            limit=_STREAM_LIMIT,
        )
    except OSError as exc:
        raise PermanentError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    return HostProcess(process, process.stdin, process.stdout, process.stderr, None)


async def _start_with_terminal(
    argv: Sequence[str], env: Mapping[str, str], cwd: Path, size: tuple[int, int] | None
) -> HostProcess:
    master, slave = os.openpty()
    try:
        if size is not None:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=dict(env),
                cwd=cwd,
                # A session of its own with the terminal as its controlling one: job control, ^C and SIGWINCH
                # reach it as they would in a terminal window.
                preexec_fn=_take_terminal,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PermanentError(f"cannot run {argv[0]!r}: {getattr(exc, 'strerror', None) or exc}") from exc
    except BaseException:
        os.close(master)
        raise
    finally:
        # Only the process holds the slave now: when it (and its children) exit, reading the master ends.
        os.close(slave)
    loop = asyncio.get_running_loop()
    stdout = asyncio.StreamReader(limit=_STREAM_LIMIT)
    writer_fd, control = os.dup(master), os.dup(master)
    try:
        await loop.connect_read_pipe(lambda: _TerminalReaderProtocol(stdout), os.fdopen(master, "rb", buffering=0))
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), os.fdopen(writer_fd, "wb", buffering=0)
        )
    except BaseException:
        os.close(control)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        raise
    stdin = asyncio.StreamWriter(transport, protocol, None, loop)
    return HostProcess(process, stdin, stdout, None, control)


def _take_terminal() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
