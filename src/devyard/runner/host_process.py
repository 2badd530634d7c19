"""``start_host_process``: a process on this host with its streams attached, as a ``runtime.ExecProcess``.

Both runtimes' ``open_exec`` start their processes this way: the fake runtime runs the command itself (a test
double: as the runner's own user, in a scratch directory), and the linux runtime runs ``runc exec`` (the command
line from ``linux.runc.Runc.exec_argv``), which relays its stdio, signals and exit status to and from the process
inside the container.

Without a TTY the process gets three pipes, in a session of its own. With one it gets the slave side of a new
pseudo-terminal as its controlling terminal (a new session), and ``stdout`` reads the master side, so ``resize``
sets the size that the process sees and the kernel sends it SIGWINCH. ``raw`` makes that terminal carry bytes
only, for a program that makes a terminal of its own and proxies it (``runc exec --tty``). A terminal has no end
of file of its own: ``stdin.write_eof()`` and ``stdin.close()`` send EOT (^D), which a program reading it takes
for the end of its input. Once the process exited, ``wait`` closes the master side for writing; reading it ends
when the last process holding the slave side is gone.

Output is read through asyncio's stream readers, which stop reading from the pipe or terminal while their buffer
is full: a process that writes faster than the caller reads blocks, instead of filling the runner's memory.

The exit code is the process's status, or 128 + N when signal N killed it.

``watch_children_by_pidfd``: the runner's and the local daemon's mains call it once, in their event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import termios
import tty as terminal_modes
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from devyard.runner.errors import PermanentError

__all__ = ["HostProcess", "start_host_process", "watch_children_by_pidfd"]

#: util-linux's setsid, which every Linux host has (Debian: essential).
_SETSID = shutil.which("setsid") or "/usr/bin/setsid"
#: How much output a stream buffers before reading from the process pauses.
_STREAM_LIMIT: Final = 64 * 1024

#: End of transmission (^D): at the start of a line, a terminal's end of file for the program reading it.
_TERMINAL_EOF: Final = b"\x04"


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

    @property
    def exited(self) -> bool:
        """Whether the process is known to have exited (it was waited for)."""
        return self._process.returncode is not None

    async def resize(self, rows: int, columns: int) -> None:
        if self._terminal is None:
            return
        with contextlib.suppress(OSError):  # the terminal closed: the process is gone
            _set_size(self._terminal, (rows, columns))

    async def signal(self, number: int) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(number)

    async def wait(self) -> int:
        code = await self._process.wait()
        if self._terminal is not None:
            os.close(self._terminal)
            self._terminal = None
            # Nobody writes to a finished process: input still buffered for it is dropped, and the master side
            # stays open only for reading what the terminal still holds.
            if not self.stdin.transport.is_closing():
                self.stdin.transport.abort()
        return 128 - code if code < 0 else code


class _TerminalReaderProtocol(asyncio.StreamReaderProtocol):
    """Reading a pseudo-terminal's master after the last process holding the slave exited fails with EIO:
    that is its end of file, not an error."""

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.EIO:
            exc = None
        super().connection_lost(exc)


class _TerminalWriter(asyncio.StreamWriter):
    """Input to a terminal: its end of file is EOT, not closing (the terminal stays open for the process)."""

    def write_eof(self) -> None:
        self.write(_TERMINAL_EOF)

    def close(self) -> None:
        if not self.transport.is_closing():
            self.write(_TERMINAL_EOF)  # written before the descriptor closes
        super().close()


def watch_children_by_pidfd() -> None:
    """Have asyncio learn that its child processes exited through pidfds (Linux 5.3 and later) instead of a
    thread per child, Python 3.11's default (``ThreadedChildWatcher``; 3.12 picks pidfds by itself): a runner
    starts a dozen short processes (runc, ip, mount) for each environment it starts, and a thread each cost a few
    milliseconds of its event loop's time. Only for a process whose one event loop is the running one."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return  # a kernel without pidfds: the threads stay
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)


async def start_host_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    tty: bool,
    size: tuple[int, int] | None = None,
    raw: bool = False,
) -> HostProcess:
    """Start ``argv`` with exactly ``env`` (None: the runner's own) in ``cwd`` (None: the runner's own), with a
    terminal of ``size`` (``(rows, columns)``) when ``tty``, in raw mode when ``raw``; ``PermanentError`` when
    it cannot be started."""
    if not argv:
        raise PermanentError("nothing to run: the command is empty")
    environment = None if env is None else dict(env)
    if tty:
        return await _start_with_terminal(argv, environment, cwd, size, raw)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
            cwd=cwd,
            # Its own session: a signal to the runner's process group (a Ctrl-C) is not the process's.
            start_new_session=True,
            limit=_STREAM_LIMIT,
        )
    except OSError as exc:
        raise PermanentError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    return HostProcess(process, process.stdin, process.stdout, process.stderr, None)


async def _start_with_terminal(
    argv: Sequence[str], env: dict[str, str] | None, cwd: Path | None, size: tuple[int, int] | None, raw: bool
) -> HostProcess:
    master, slave = os.openpty()
    try:
        if raw:
            terminal_modes.setraw(slave)
        if size is not None:
            _set_size(master, size)
        try:
            process = await asyncio.create_subprocess_exec(
                # A session of its own with the terminal as its controlling one: job control, ^C and SIGWINCH
                # reach it as they would in a terminal window. util-linux's setsid does that between fork and
                # exec; Python code there (preexec_fn) could deadlock in a runner with threads.
                _SETSID,
                "--ctty",
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                cwd=cwd,
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
    stdin = _TerminalWriter(transport, protocol, None, loop)
    return HostProcess(process, stdin, stdout, None, control)


def _set_size(terminal: int, size: tuple[int, int]) -> None:
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
