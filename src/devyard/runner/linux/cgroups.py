"""Control groups of environments' containers, on cgroup v1 (one hierarchy per controller) and v2 hosts.

Called by ``runtime.LinuxRuntime``: ``resources`` and ``cgroups_path`` go into the OCI configuration (runc
makes and fills the groups), ``environment_cgroups``, ``leftover_cgroups`` and ``remove_cgroup`` find and
remove what a container left behind (a runner killed between ``runc`` steps, a crash of runc itself).

Every environment's group is ``/<parent>/<environment id>`` in every hierarchy: an absolute path, because runc
reads a relative one as relative to its *own* group, which differs from hierarchy to hierarchy and from one
runner process to the next, and then leftovers could not be found.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DEFAULT_PIDS_LIMIT",
    "CgroupVersion",
    "cgroups_path",
    "detect_version",
    "environment_cgroups",
    "hierarchies",
    "kill_cgroup",
    "leftover_cgroups",
    "remove_cgroup",
    "resources",
]

#: Processes (and threads) one environment may hold: enough for any build, few enough to stop a fork bomb.
DEFAULT_PIDS_LIMIT: Final = 4096
_CPU_PERIOD_MICROSECONDS: Final = 100_000
_MIB: Final = 1024 * 1024
_CGROUP_ROOT: Final = Path("/sys/fs/cgroup")


class CgroupVersion(enum.Enum):
    V1 = 1
    V2 = 2


def detect_version(root: Path = _CGROUP_ROOT) -> CgroupVersion:
    """V2 when ``root`` is a unified hierarchy (it has ``cgroup.controllers``), else V1 (legacy or hybrid)."""
    return CgroupVersion.V2 if (root / "cgroup.controllers").exists() else CgroupVersion.V1


def cgroups_path(parent: str, environment_id: str) -> str:
    """The OCI ``linux.cgroupsPath`` of an environment's container."""
    return f"/{parent.strip('/')}/{environment_id}"


def resources(
    *,
    cpu: float | None,
    memory_mib: int | None,
    pids_limit: int = DEFAULT_PIDS_LIMIT,
    version: CgroupVersion | None = None,
    root: Path = _CGROUP_ROOT,
) -> dict[str, Any]:
    """The OCI ``linux.resources`` of a container: CPU quota, memory without swap, a pids limit, and a device
    list that starts by denying all (runc then allows its standard devices).

    ``cpu=2`` is a quota of 200 ms per 100 ms period. Swap equals memory (memory+swap, as OCI counts it), so the
    container gets no swap; on a v1 host without swap accounting there is no memsw file and swap is left out.
    """
    version = version or detect_version(root)
    result: dict[str, Any] = {
        "devices": [{"allow": False, "access": "rwm"}],
        "pids": {"limit": pids_limit},
    }
    if cpu is not None:
        if cpu <= 0:
            raise ValueError(f"cpu must be positive, not {cpu}")
        result["cpu"] = {"quota": max(1000, round(cpu * _CPU_PERIOD_MICROSECONDS)), "period": _CPU_PERIOD_MICROSECONDS}
    if memory_mib is not None:
        if memory_mib <= 0:
            raise ValueError(f"memory_mib must be positive, not {memory_mib}")
        limit = memory_mib * _MIB
        memory: dict[str, Any] = {"limit": limit}
        if version is CgroupVersion.V2 or (root / "memory" / "memory.memsw.limit_in_bytes").exists():
            memory["swap"] = limit
        result["memory"] = memory
    return result


def hierarchies(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Path]:
    """The mount points of every cgroup hierarchy on the host (v1 ones, and the v2 one of a hybrid or v2 host)."""
    found: list[Path] = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        filesystem = fields[1].split(" ", 1)[0]
        if filesystem in ("cgroup", "cgroup2"):
            mount_point = fields[0].split(" ")[4]
            found.append(Path(mount_point.replace("\\040", " ")))
    return found


def environment_cgroups(parent: str, environment_id: str) -> list[Path]:
    """The directories of an environment's group that exist, one per hierarchy."""
    relative = cgroups_path(parent, environment_id).lstrip("/")
    return [hierarchy / relative for hierarchy in hierarchies() if (hierarchy / relative).is_dir()]


def leftover_cgroups(parent: str) -> dict[str, list[Path]]:
    """Every group under ``parent`` in any hierarchy, by environment id (the group's name)."""
    found: dict[str, list[Path]] = {}
    for hierarchy in hierarchies():
        directory = hierarchy / parent.strip("/")
        if not directory.is_dir():
            continue
        for child in sorted(directory.iterdir()):
            if child.is_dir():
                found.setdefault(child.name, []).append(child)
    return found


def _processes(directory: Path) -> list[int]:
    pids: list[int] = []
    for group in [directory, *(path for path in directory.rglob("*") if path.is_dir())]:
        try:
            text = (group / "cgroup.procs").read_text()
        except FileNotFoundError:
            continue
        pids += [int(line) for line in text.split()]
    return pids


def kill_cgroup(directory: Path) -> int:
    """SIGKILL every process in the group and its children; return how many were signalled.

    For crash cleanup only: a container runc still knows is killed through ``runc delete --force``, which freezes
    the group first. A fork bomb could outrun this loop, but not a pids limit, so a few rounds reach them all.
    """
    kill_file = directory / "cgroup.kill"
    if kill_file.exists():  # v2 (kernel 5.14+): the kernel kills them all at once
        kill_file.write_text("1")
        return len(_processes(directory))
    signalled = 0
    for _round in range(10):
        pids = _processes(directory)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                signalled += 1
            except ProcessLookupError:
                pass
    return signalled


def remove_cgroup(directories: Iterable[Path]) -> list[Path]:
    """Remove each group (its child groups first) if no process is left in it; return those removed.

    A group with processes stays, and is reported by the caller as an orphan to look at.
    """
    removed: list[Path] = []
    for directory in directories:
        if not directory.is_dir():
            continue
        children = sorted((path for path in directory.rglob("*") if path.is_dir()), key=lambda p: -len(p.parts))
        try:
            for child in [*children, directory]:
                child.rmdir()  # rmdir on a cgroup directory works although it holds (virtual) files
        except OSError:
            continue
        removed.append(directory)
    return removed
