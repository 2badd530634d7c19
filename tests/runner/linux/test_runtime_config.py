"""The linux runtime's pure parts: PID 1's rule, cgroup resources on v1 and v2, hostnames, the seccomp
profile's architectures, and the OCI configuration's namespaces and mappings."""

from __future__ import annotations

from pathlib import Path

import pytest

from devyard.runner.images.image import IdRange, ImageConfig
from devyard.runner.linux import cgroups, oci_config, seccomp
from devyard.runner.linux.runtime import KEEP_ALIVE, init_process


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "keep_alive"),
    [
        ((), (), True),
        ((), ("bash",), True),
        ((), ("/bin/sh", "-l"), True),
        (("/usr/bin/zsh",), (), True),
        ((), ("sh", "-c", "exec my-server"), False),
        (("/docker-entrypoint.sh",), ("nginx",), False),
        ((), ("python3",), False),
    ],
)
def test_pid_1_is_the_keep_alive_for_a_shell_or_nothing(
    entrypoint: tuple[str, ...], cmd: tuple[str, ...], keep_alive: bool
) -> None:
    argv = init_process(ImageConfig(entrypoint=entrypoint, cmd=cmd))
    assert (argv == KEEP_ALIVE) is keep_alive
    if not keep_alive:
        assert argv == (*entrypoint, *cmd)


def test_resources_on_v1_and_v2(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert cgroups.detect_version(tmp_path) is cgroups.CgroupVersion.V2
    v2 = cgroups.resources(cpu=2, memory_mib=512, pids_limit=100, root=tmp_path)
    assert v2["cpu"] == {"quota": 200_000, "period": 100_000}
    assert v2["memory"] == {"limit": 512 << 20, "swap": 512 << 20}
    assert v2["pids"] == {"limit": 100}

    legacy = tmp_path / "v1"
    (legacy / "memory").mkdir(parents=True)
    assert cgroups.detect_version(legacy) is cgroups.CgroupVersion.V1
    no_swap_accounting = cgroups.resources(cpu=None, memory_mib=64, root=legacy)
    assert no_swap_accounting["memory"] == {"limit": 64 << 20}
    assert "cpu" not in no_swap_accounting
    (legacy / "memory" / "memory.memsw.limit_in_bytes").write_text("0")
    assert cgroups.resources(cpu=0.5, memory_mib=64, root=legacy)["memory"]["swap"] == 64 << 20
    with pytest.raises(ValueError, match="cpu"):
        cgroups.resources(cpu=0, memory_mib=None, root=legacy)


def test_cgroups_path_is_absolute_under_the_parent() -> None:
    assert cgroups.cgroups_path("devyard", "env_1") == "/devyard/env_1"
    assert cgroups.cgroups_path("/a/b/", "env_1") == "/a/b/env_1"


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"devyard.io/name": "My Project_2"}, "my-project-2"),
        ({"devyard.io/name": "---"}, "env_01abc"),
        ({}, "env_01abc"),
        ({"devyard.io/name": "x" * 80}, "x" * 63),
    ],
)
def test_hostname(labels: dict[str, str], expected: str) -> None:
    assert oci_config.hostname_for(labels, "env_01ABC") == expected.replace("_", "-")


def test_seccomp_profile_covers_the_compat_architectures() -> None:
    assert seccomp.seccomp_profile("x86_64")["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    profile = seccomp.seccomp_profile("aarch64")
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    [rule] = profile["syscalls"]
    assert {"kexec_load", "bpf", "keyctl", "userfaultfd"} <= set(rule["names"])
    assert (rule["action"], rule["errnoRet"]) == ("SCMP_ACT_ERRNO", 1)
    with pytest.raises(ValueError, match="mips"):
        seccomp.seccomp_profile("mips")


def test_config_maps_the_id_range_and_makes_every_namespace() -> None:
    document = oci_config.container_config(
        rootfs=Path("/r"),
        process=oci_config.ContainerProcess(args=["/bin/sh"]),
        hostname="h",
        id_range=IdRange(start=200_000, size=1000),
        netns_path=None,
        cgroups_path="/devyard/env_1",
        resources={},
        seccomp=seccomp.seccomp_profile("x86_64"),
    )
    linux = document["linux"]
    assert linux["uidMappings"] == linux["gidMappings"] == [{"containerID": 0, "hostID": 200_000, "size": 1000}]
    assert {n["type"] for n in linux["namespaces"]} == {"user", "pid", "mount", "ipc", "uts", "cgroup", "network"}
    assert "CAP_SYS_ADMIN" not in document["process"]["capabilities"]["bounding"]
    assert document["process"]["noNewPrivileges"] is False
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
