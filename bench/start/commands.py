"""Programs the benchmark runs (runc, docker, skopeo...), each with a deadline, failing with its stderr.

Called by every other module of ``bench.start``. Timing is the caller's: it wraps ``run`` in
``time.perf_counter()``, so a figure includes starting the program, as it does for a user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["CommandFailed", "find", "run", "unmount_under"]


class CommandFailed(RuntimeError):
    """A program exited non-zero, or overran its deadline; the message has its command line and stderr."""


def find(program: str, *candidates: str) -> str | None:
    """The first of ``candidates`` (absolute paths) that is executable, else ``program`` on PATH, else None."""
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which(program)


def run(
    argv: Sequence[str | Path],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    leaves_process: bool = False,
) -> str:
    """Run ``argv`` to its end within ``timeout`` seconds and return its stdout.

    ``leaves_process``: the program leaves a process behind that inherits its stdout and stderr (``runc run
    -d`` hands its stdio to the container): they go to a file instead of pipes, whose end of file would come
    only when the container ends, and stdout is not returned.
    """
    command = [str(part) for part in argv]
    environment = None if env is None else {**os.environ, **env}
    with tempfile.TemporaryFile() as spill:
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=spill if leaves_process else subprocess.PIPE,
                stderr=spill if leaves_process else subprocess.PIPE,
                timeout=timeout,
                env=environment,
                cwd=cwd,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            stderr = (exc.stderr or b"").decode(errors="replace").strip()
            raise CommandFailed(f"{' '.join(command)}: no answer within {timeout:g} s; stderr: {stderr!r}") from None
        except OSError as exc:
            raise CommandFailed(f"{' '.join(command)}: cannot start it: {exc}") from None
        if leaves_process:
            spill.seek(0)
            result.stderr, result.stdout = spill.read(), b""
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        stdout = (result.stdout or b"").decode(errors="replace").strip()[-2000:]
        raise CommandFailed(
            f"{' '.join(command)}: exit status {result.returncode}; stderr: {stderr[-3000:]!r}; stdout: {stdout!r}"
        )
    return (result.stdout or b"").decode(errors="replace")


def unmount_under(directory: Path) -> None:
    """Unmount (lazily, deepest first) whatever is still mounted below ``directory``: what a stopped daemon
    left, before the directory is removed."""
    prefix = str(directory.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True, timeout=30)
