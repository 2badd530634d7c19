"""The seccomp profile of every environment's container: allow by default, refuse what a dev environment must
never do to the host.

Called by ``oci_config.container_config``; the result is the OCI ``linux.seccomp`` object runc 1.1 reads.

Why a deny list rather than Docker's allow list: a dev environment runs arbitrary tools (debuggers, build
systems, nested sandboxes), and the user namespace already strips host privilege from everything the kernel
checks with ``ns_capable``. What is left are the syscalls that act on the whole host (the clock, modules,
kexec, swap, accounting), the kernel keyring (not namespaced), and large attack surfaces that Docker's default
profile also refuses to unprivileged containers (bpf, perf_event_open, userfaultfd, open_by_handle_at...).
They fail with EPERM, so programs see an ordinary "not permitted". ``mount``, ``unshare`` and ``clone`` with
new namespaces stay allowed: the kernel's rules for user namespaces decide them, as they do for any user.
"""

from __future__ import annotations

import platform
from typing import Any, Final

__all__ = ["DENIED_SYSCALLS", "seccomp_profile"]

#: Syscalls every container is refused (EPERM). Names the host's libseccomp does not know are skipped by runc.
DENIED_SYSCALLS: Final[tuple[str, ...]] = (
    # Act on the whole host.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "adjtimex",
    "syslog",
    "iopl",
    "ioperm",
    "nfsservctl",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "_sysctl",
    "sysfs",
    "ustat",
    "uselib",
    "vm86",
    "vm86old",
    # The kernel keyring is not namespaced.
    "keyctl",
    "add_key",
    "request_key",
    # Large kernel attack surfaces, refused to unprivileged containers by Docker's default profile too.
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "fanotify_init",
    "kcmp",
    "mbind",
    "set_mempolicy",
    "move_pages",
)

_EPERM: Final = 1

#: The seccomp architectures of a host (``platform.machine()``): the native one and the compat ones a binary of
#: the host could use, so a 32-bit program cannot reach a syscall by its other number.
_ARCHITECTURES: Final[dict[str, tuple[str, ...]]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
    "arm64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
    "ppc64le": ("SCMP_ARCH_PPC64LE",),
    "s390x": ("SCMP_ARCH_S390X", "SCMP_ARCH_S390"),
    "riscv64": ("SCMP_ARCH_RISCV64",),
}


def seccomp_profile(machine: str | None = None) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object for a host of architecture ``machine`` (default: this one)."""
    machine = machine or platform.machine()
    try:
        architectures = _ARCHITECTURES[machine]
    except KeyError:
        raise ValueError(f"no seccomp architectures known for machine {machine!r}") from None
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": list(architectures),
        "syscalls": [{"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": _EPERM}],
    }
