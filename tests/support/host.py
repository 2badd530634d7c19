"""What the tests of the linux runtime need from the host: root, Linux, and some programs (runc, nft...).

``require(*programs)`` skips a test that cannot run here, except under ``CI=true``, where a missing
prerequisite fails the test: CI installs everything (``scripts/setup``), so a skip there would hide a broken
setup as a green run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["in_ci", "links_named", "one_at_a_time", "require"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(*programs: str) -> None:
    """Skip (or, in CI, fail) unless this is Linux, we are root, and every program is on PATH."""
    missing: list[str] = []
    if sys.platform != "linux":
        missing.append("Linux")
    elif os.geteuid() != 0:
        missing.append("root")
    missing += [program for program in programs if shutil.which(program) is None]
    if not missing:
        return
    reason = f"needs {', '.join(missing)} (scripts/setup installs the programs)"
    if in_ci():
        pytest.fail(f"CI=true and this host lacks what the test {reason}", pytrace=False)
    pytest.skip(reason)


def links_named(prefix: str) -> set[str]:
    """The host's network interfaces whose names start with ``prefix`` (what a run may leave behind)."""
    links = subprocess.run(["ip", "-brief", "link"], capture_output=True, text=True, check=False).stdout.splitlines()
    return {line.split()[0] for line in links if line.startswith(prefix)}


@contextlib.contextmanager
def one_at_a_time(name: str) -> Iterator[None]:
    """Hold the host-wide lock ``name``: tests that take it run one at a time, even on pytest-xdist's workers."""
    with Path(f"/tmp/devyard-tests-{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
