"""The OCI runtime configuration (``config.json``) of an environment's container, made in code.

Called by ``runtime.LinuxRuntime`` before every ``runc create``. What every container gets:

- a user namespace mapping ids 0..size-1 inside to ``IdRange`` outside, so root inside is nobody outside;
- its own pid, mount, ipc, uts and cgroup namespaces, and a network namespace: the one the runner's network
  made for it (``netns_path``) or, without a network, a fresh one with only loopback;
- Docker's default capabilities (held inside the user namespace only), ``noNewPrivileges`` off so that sudo
  works inside, the seccomp profile of ``seccomp``, and /proc and /sys paths masked or read-only as Docker does;
- the standard /proc, /dev, /dev/pts, /dev/shm, /dev/mqueue, /sys and cgroup mounts, and read-only binds
  (the environment's /etc/resolv.conf and /etc/hosts, and any the runtime adds).

runc adds the standard devices (null, zero, full, random, urandom, tty; ptmx from devpts) itself, bind mounted
from the host because a user namespace cannot mknod.
"""

from __future__ import annotations

import re
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from devyard.runner.images.image import IdRange

__all__ = [
    "ALL_CAPABILITIES",
    "CAPABILITIES",
    "MASKED_PATHS",
    "READONLY_PATHS",
    "BindMount",
    "ContainerProcess",
    "capability_set",
    "container_config",
    "hostname_for",
    "nofile_limit",
]

#: Docker's default capability set; within the user namespace, they act only on what the namespace owns.
CAPABILITIES: Final[tuple[str, ...]] = tuple(
    f"CAP_{name}"
    for name in (
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    )
)

#: Every capability of Linux 5.9 and later (``--privileged``): still bounded by the user namespace.
ALL_CAPABILITIES: Final[tuple[str, ...]] = tuple(
    f"CAP_{name}"
    for name in (
        "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
        "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
        "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
        "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
        "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
        "CHECKPOINT_RESTORE",
    )
)  # fmt: skip

MASKED_PATHS: Final[tuple[str, ...]] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
)

READONLY_PATHS: Final[tuple[str, ...]] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

_WANTED_NOFILE: Final = 1_048_576
_HOSTNAME_MAX: Final = 63


@dataclass(frozen=True)
class BindMount:
    """A host file or directory made visible inside the container."""

    source: Path
    destination: str
    read_only: bool = True


@dataclass(frozen=True)
class ContainerProcess:
    """The container's init: what runs, as whom, where."""

    args: Sequence[str]
    env: Sequence[str] = ()
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: Sequence[int] = field(default_factory=tuple)


def capability_set(extra: Sequence[str], *, privileged: bool) -> tuple[str, ...]:
    """The default capabilities plus ``extra`` (``SYS_PTRACE`` or ``CAP_SYS_PTRACE``), or all of them when
    ``privileged``; an unknown name is a ValueError."""
    if privileged:
        return ALL_CAPABILITIES
    wanted = list(CAPABILITIES)
    for name in extra:
        full = name.upper() if name.upper().startswith("CAP_") else f"CAP_{name.upper()}"
        if full not in ALL_CAPABILITIES:
            raise ValueError(f"unknown capability {name!r}")
        wanted.append(full)
    return tuple(dict.fromkeys(wanted))


def hostname_for(labels: Mapping[str, str], environment_id: str) -> str:
    """The container's hostname: the environment's name (label ``devyard.io/name``) as a DNS label, else its id."""
    for candidate in (labels.get("devyard.io/name", ""), environment_id):
        label = re.sub(r"[^a-z0-9-]+", "-", candidate.lower()).strip("-")[:_HOSTNAME_MAX].strip("-")
        if label:
            return label
    return "devyard"


def nofile_limit() -> int:
    """RLIMIT_NOFILE for containers: 1048576, or the runner's own hard limit if lower.

    runc sets rlimits from inside the user namespace, where raising a hard limit is not permitted, so the
    runner's hard limit (which the container's init inherits) is the most it can get.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return _WANTED_NOFILE if hard == resource.RLIM_INFINITY else min(_WANTED_NOFILE, hard)


def container_config(
    *,
    rootfs: Path,
    process: ContainerProcess,
    hostname: str,
    id_range: IdRange,
    netns_path: Path | None,
    cgroups_path: str,
    resources: Mapping[str, Any],
    seccomp: Mapping[str, Any],
    binds: Sequence[BindMount] = (),
    tmpfs: Sequence[str] = (),
    capabilities: Sequence[str] = CAPABILITIES,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The whole ``config.json`` document. ``tmpfs``: paths inside that get an empty tmpfs at each start."""
    capabilities = list(dict.fromkeys(capabilities))
    nofile = nofile_limit()
    network: dict[str, str] = {"type": "network"}
    if netns_path is not None:
        network["path"] = str(netns_path)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": process.uid, "gid": process.gid, "additionalGids": list(process.additional_gids)},
            "args": list(process.args),
            "env": list(process.env),
            "cwd": process.cwd or "/",
            "capabilities": {
                "bounding": capabilities,
                "effective": capabilities,
                "permitted": capabilities,
                "inheritable": [],
                "ambient": [],
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            # sudo and setuid programs inside must work; the user namespace bounds what they can gain.
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": _mounts(own_network=netns_path is None, binds=binds, tmpfs=tmpfs),
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": id_range.start, "size": id_range.size}],
            "gidMappings": [{"containerID": 0, "hostID": id_range.start, "size": id_range.size}],
            "namespaces": [
                {"type": "user"},
                {"type": "pid"},
                {"type": "mount"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "cgroup"},
                network,
            ],
            "cgroupsPath": cgroups_path,
            "resources": dict(resources),
            "seccomp": dict(seccomp),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
        "annotations": dict(annotations or {}),
    }


def _mounts(*, own_network: bool, binds: Sequence[BindMount], tmpfs: Sequence[str]) -> list[dict[str, Any]]:
    if own_network:
        sys_mount: dict[str, Any] = {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        }
    else:
        # The kernel lets a user namespace mount sysfs only in a network namespace it owns; one the runner's
        # network made belongs to the host's user namespace, so the host's /sys is bound instead, read-only.
        sys_mount = {
            "destination": "/sys",
            "type": "bind",
            "source": "/sys",
            "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
        }
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        sys_mount,
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]
    for bind in binds:
        options = ["rbind", "rprivate", "nosuid", "nodev"]
        if bind.read_only:
            options.append("ro")
        mounts.append({"destination": bind.destination, "type": "bind", "source": str(bind.source), "options": options})
    for destination in tmpfs:
        options = ["nosuid", "nodev", "mode=1777"]
        mounts.append({"destination": destination, "type": "tmpfs", "source": "tmpfs", "options": options})
    return mounts
