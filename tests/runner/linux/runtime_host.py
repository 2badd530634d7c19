"""Fixtures of the linux runtime's tests: a busybox layer per session, and a ``LinuxRuntime`` per test whose
state directory, runc root and cgroup parent are its own, removed after the test however it ended.

The state directories live under /var/tmp, not pytest's tmp_path: runc enters the container's user namespace
before it reaches the bundle, so every directory above the root file system must be searchable by the
unprivileged ids of the namespace, and pytest's are 0700.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devyard.runner.images.image import IdRange
from devyard.runner.linux import cgroups
from devyard.runner.linux.runtime import LinuxRuntime
from support import host

from .busybox_image import BusyboxImages, build_busybox_layer

__all__ = [
    "ID_RANGE",
    "RuntimeHost",
    "busybox_layer_fixture",
    "delete_all",
    "make_runtime",
    "running_runtime",
    "runtime_host_fixture",
    "scrub",
]

ID_RANGE = IdRange()


@pytest.fixture(scope="session", name="busybox_layer")
def busybox_layer_fixture() -> Iterator[Path]:
    base = Path(f"/var/tmp/devyard-runtime-layer-{secrets.token_hex(4)}")
    try:
        yield build_busybox_layer(base / "busybox", ID_RANGE)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class RuntimeHost:
    """One test's corner of the host: where its runtimes keep state, and its cgroup parent."""

    base: Path
    state_dir: Path
    cgroup_parent: str
    layer: Path

    def mounts(self) -> list[str]:
        return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(self.base) in line]

    def cgroup_dirs(self) -> list[Path]:
        return [h / self.cgroup_parent for h in cgroups.hierarchies() if (h / self.cgroup_parent).exists()]

    def runc_containers(self) -> list[str]:
        root = self.state_dir / "runc"
        if not root.exists():
            return []
        output = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True, check=True)
        return output.stdout.split()


def make_runtime(where: RuntimeHost, **options: object) -> LinuxRuntime:
    images = BusyboxImages(where.layer, ID_RANGE)
    return LinuxRuntime(where.state_dir, images=images, cgroup_parent=where.cgroup_parent, **options)  # type: ignore[arg-type]


def scrub(where: RuntimeHost) -> None:
    """Remove whatever the test left on the host: runc containers, mounts, cgroups, files."""
    for container in where.runc_containers():
        subprocess.run(["runc", "--root", str(where.state_dir / "runc"), "delete", "--force", container], check=False)
    for line in reversed(where.mounts()):
        subprocess.run(["umount", "--lazy", line.split(" ")[4]], check=False)
    for directory in where.cgroup_dirs():
        for child in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            cgroups.kill_cgroup(child)
            for _attempt in range(50):
                with contextlib.suppress(OSError):
                    child.rmdir()
                    break
                subprocess.run(["sleep", "0.1"], check=False)
        with contextlib.suppress(OSError):
            directory.rmdir()
    shutil.rmtree(where.base, ignore_errors=True)


@pytest.fixture(name="runtime_host")
def runtime_host_fixture(busybox_layer: Path) -> Iterator[RuntimeHost]:
    host.require("runc", "mount", "umount")
    token = secrets.token_hex(4)
    base = Path(f"/var/tmp/devyard-runtime-{token}")
    base.mkdir(mode=0o711)
    os.chmod(base, 0o711)
    where = RuntimeHost(base=base, state_dir=base / "state", cgroup_parent=f"devyard-test-{token}", layer=busybox_layer)
    try:
        yield where
    finally:
        scrub(where)


async def delete_all(runtime: LinuxRuntime) -> None:
    for status in await runtime.list():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runtime.delete(status.environment_id), 30)


@contextlib.asynccontextmanager
async def running_runtime(where: RuntimeHost, **options: object) -> AsyncIterator[LinuxRuntime]:
    runtime = make_runtime(where, **options)
    try:
        yield runtime
    finally:
        await delete_all(runtime)
        await runtime.close()
