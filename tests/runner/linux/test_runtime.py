"""The linux runtime on real runc: the lifecycle and its idempotency, exec with and without a terminal,
isolation (user namespace, pid namespace, seccomp, read-only binds), cgroup limits (memory, pids, cpu),
adoption by a new runtime instance, and stop's grace period.

Every test gets its own state directory, runc root and cgroup parent (``runtime_host``), scrubbed afterwards.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from devyard.runner.errors import ContainerNotFound, ContainerNotRunning, PermanentError
from devyard.runner.images.image import Prepared, Progress, ProgressCallback
from devyard.runner.linux import cgroups
from devyard.runner.linux.network import Network
from devyard.runner.linux.oci_config import BindMount
from devyard.runner.runtime import ContainerSpec, ContainerState, ExecRequest
from support import host

from .busybox_image import BusyboxImages
from .runtime_host import ID_RANGE, RuntimeHost, busybox_layer_fixture, running_runtime, runtime_host_fixture  # noqa: F401  (fixtures)

TESTS_DIR = Path(__file__).resolve().parents[2]


def spec(environment_id: str = "env_a", image: str = "busybox", **changes: object) -> ContainerSpec:
    return ContainerSpec(environment_id=environment_id, image=image, **changes)  # type: ignore[arg-type]


async def test_lifecycle_keeps_disk_across_stop_and_removes_everything_on_delete(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        created = await runtime.create(spec(env={"SPEC_VAR": "from-spec"}, labels={"devyard.io/name": "My Box"}))
        assert created.state is ContainerState.CREATED
        assert {"pull", "unpack", "create"} <= set(created.timings)
        assert await runtime.create(spec()) == created  # idempotent: the existing one, as it is

        started = await runtime.start("env_a")
        assert started.state is ContainerState.RUNNING and started.started_at is not None
        assert "start" in started.timings
        assert (await runtime.start("env_a")).state is ContainerState.RUNNING

        result = await runtime.exec("env_a", ["sh", "-c", 'echo "$IMAGE_VAR $SPEC_VAR $(hostname)"; echo err >&2'])
        assert (result.exit_code, result.stdout, result.stderr) == (0, b"from-image from-spec my-box\n", b"err\n")
        assert (await runtime.exec("env_a", ["sh", "-c", "echo kept > /root/file"])).exit_code == 0

        stopped = await runtime.stop("env_a")
        assert (stopped.state, stopped.exit_code) == (ContainerState.STOPPED, 0)  # 0: SIGTERM ended it, no kill
        assert runtime_host.mounts() == []
        assert runtime_host.runc_containers() == []
        assert await runtime.stop("env_a") == stopped
        with pytest.raises(ContainerNotRunning):
            await runtime.exec("env_a", ["true"])

        again = await runtime.start("env_a")
        assert again.state is ContainerState.RUNNING
        assert (await runtime.exec("env_a", ["cat", "/root/file"])).stdout == b"kept\n"
        assert [s.environment_id for s in await runtime.list()] == ["env_a"]

        await runtime.delete("env_a")
        await runtime.delete("env_a")
        assert await runtime.inspect("env_a") is None
        assert await runtime.list() == []
        assert runtime_host.mounts() == []
        assert runtime_host.runc_containers() == []
        assert cgroups.environment_cgroups(runtime_host.cgroup_parent, "env_a") == []
        assert not (runtime_host.state_dir / "environments" / "env_a").exists()
        assert runtime.images.holders == {}  # type: ignore[attr-defined]
        assert await runtime.orphans() == []


async def test_missing_containers_and_images(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        with pytest.raises(ContainerNotFound):
            await runtime.start("env_missing")
        with pytest.raises(ContainerNotFound):
            await runtime.stop("env_missing")
        await runtime.delete("env_missing")
        with pytest.raises(PermanentError):
            await runtime.create(spec(image="no-such-image"))
        assert not (runtime_host.state_dir / "environments" / "env_a").exists()
        await runtime.create(spec())
        with pytest.raises(ContainerNotRunning):
            await runtime.exec("env_a", ["true"])
        stopped = await runtime.stop("env_a")  # a created one stays created
        assert stopped.state is ContainerState.CREATED


async def test_exec_with_a_terminal(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        await runtime.create(spec())
        await runtime.start("env_a")

        process = await runtime.open_exec("env_a", ExecRequest(argv=["tty"], tty=True))
        assert process.stderr is None
        assert re.fullmatch(rb"/dev/pts/\d+\r\n", await process.stdout.read())
        assert await process.wait() == 0

        process = await runtime.open_exec("env_a", ExecRequest(argv=["cat"], tty=True))
        process.stdin.write(b"hello\n")
        await process.stdin.drain()
        seen = b""
        while seen.count(b"hello") < 2:  # the terminal's echo, then cat's copy
            seen += await asyncio.wait_for(process.stdout.read(100), 10)
        process.stdin.close()  # EOT: cat sees end of input
        await asyncio.wait_for(process.stdout.read(), 10)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        await asyncio.wait_for(process.stdin.wait_closed(), 10)

        # The size given at the start, then a resize while the process runs: runc copies it on the SIGWINCH that
        # the kernel sends it. Each line asks again, as runc may take the line before the signal.
        request = ExecRequest(argv=["sh", "-c", "stty size; while read _; do stty size; done"], tty=True, size=(10, 20))
        process = await runtime.open_exec("env_a", request)
        await asyncio.wait_for(process.stdout.readuntil(b"10 20\r\n"), 10)
        await process.resize(33, 101)

        async def ask_until_resized() -> None:
            seen = b""
            while b"33 101" not in seen:
                process.stdin.write(b"\n")
                await process.stdin.drain()
                seen += await process.stdout.read(100)

        await asyncio.wait_for(ask_until_resized(), 10)
        process.stdin.close()
        await asyncio.wait_for(process.stdout.read(), 10)
        assert await asyncio.wait_for(process.wait(), 10) == 0

        process = await runtime.open_exec("env_a", ExecRequest(argv=["sh", "-c", "exit 3"], tty=True))
        await process.stdout.read()
        assert await process.wait() == 3


async def test_exec_without_a_terminal(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        await runtime.create(spec())
        await runtime.start("env_a")
        assert (await runtime.exec("env_a", ["sh", "-c", "exit 3"])).exit_code == 3
        override = await runtime.exec("env_a", ["sh", "-c", "echo $IMAGE_VAR"], env={"IMAGE_VAR": "from-exec"})
        assert override.stdout == b"from-exec\n"

        process = await runtime.open_exec("env_a", ExecRequest(argv=["cat"]))
        process.stdin.write(b"through a pipe\n")
        process.stdin.close()
        assert process.stderr is not None
        assert await process.stdout.read() == b"through a pipe\n"
        assert await process.wait() == 0

        process = await runtime.open_exec("env_a", ExecRequest(argv=["sleep", "60"]))
        await asyncio.sleep(0.2)
        await process.signal(signal.SIGKILL)
        assert await process.wait() == 128 + signal.SIGKILL

        request = ExecRequest(argv=["sh", "-c", "id -u; id -g; id -G; pwd"], user="dev", cwd="/home/dev")
        process = await runtime.open_exec("env_a", request)
        process.stdin.close()
        assert (await process.stdout.read()).split() == [b"1000", b"1000", b"1000", b"100", b"/home/dev"]
        process = await runtime.open_exec("env_a", ExecRequest(argv=["id", "-u"], user="1234:55"))
        process.stdin.close()
        assert await process.stdout.read() == b"1234\n"
        with pytest.raises(PermanentError):
            await runtime.open_exec("env_a", ExecRequest(argv=["id"], user="nobody-here"))


async def test_image_user_and_working_directory(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        await runtime.create(spec(image="busybox-dev"))
        await runtime.start("env_a")
        result = await runtime.exec("env_a", ["sh", "-c", "id -u; pwd; ps -o user,comm | sed -n 2p"])
        assert result.stdout.split() == [b"1000", b"/home/dev", b"dev", b"sh"]


async def test_isolation(runtime_host: RuntimeHost) -> None:
    host_file = runtime_host.base / "host-owned"
    host_file.write_text("host data\n")
    os.chmod(host_file, 0o644)
    binds = [BindMount(host_file, "/mnt/host-owned", read_only=False)]
    async with running_runtime(runtime_host, binds=binds) as runtime:
        await runtime.create(spec())
        await runtime.start("env_a")

        write = await runtime.exec("env_a", ["sh", "-c", "cat /mnt/host-owned && echo changed > /mnt/host-owned"])
        assert write.stdout == b"host data\n" and write.exit_code != 0  # root inside is nobody to the host
        assert host_file.read_text() == "host data\n"

        processes = await runtime.exec("env_a", ["ps", "-o", "pid,comm"])
        lines = processes.stdout.decode().split("\n")[1:]
        assert next(line.split() for line in lines if line.strip()) == ["1", "sh"]
        assert len([line for line in lines if line.strip()]) <= 4  # sh, its sleep, ps; nothing of the host's

        status = (await runtime.exec("env_a", ["cat", "/proc/self/uid_map", "/proc/self/status"])).stdout.decode()
        assert status.split()[:3] == ["0", "1000000", "65536"]
        assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE)
        assert re.search(r"^NoNewPrivs:\s+0$", status, re.MULTILINE)
        refused = await runtime.exec("env_a", ["sh", "-c", "adjtimex; echo 1 > /proc/sys/kernel/ns_last_pid"])
        # adjtimex reads the clock for anyone; seccomp refuses it to containers. /proc/sys is read-only.
        assert b"Operation not permitted" in refused.stderr and b"Read-only file system" in refused.stderr
        masked = await runtime.exec("env_a", ["sh", "-c", "wc -c < /proc/kcore; ls /sys/firmware | wc -l"])
        assert masked.stdout.split()[-1] == b"0"
        loopback = await runtime.exec("env_a", ["ls", "/sys/class/net"])
        assert loopback.stdout.split() == [b"lo"]


async def test_cgroup_limits_are_in_the_cgroup_files(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        await runtime.create(spec(cpu=1.5, memory_mib=256))
        await runtime.start("env_a")
        directories = cgroups.environment_cgroups(runtime_host.cgroup_parent, "env_a")
        assert directories
        values: dict[str, str] = {}
        for directory in directories:
            for name in (
                "cpu.cfs_quota_us",
                "cpu.cfs_period_us",
                "memory.limit_in_bytes",
                "memory.memsw.limit_in_bytes",
                "pids.max",
                "cpu.max",
                "memory.max",
                "memory.swap.max",
            ):
                if (directory / name).exists():
                    values[name] = (directory / name).read_text().strip()
        if cgroups.detect_version() is cgroups.CgroupVersion.V2:
            assert values["cpu.max"] == "150000 100000"
            assert (values["memory.max"], values["memory.swap.max"]) == (str(256 << 20), "0")
        else:
            assert (values["cpu.cfs_quota_us"], values["cpu.cfs_period_us"]) == ("150000", "100000")
            assert values["memory.limit_in_bytes"] == str(256 << 20)
            assert values.get("memory.memsw.limit_in_bytes", str(256 << 20)) == str(256 << 20)
        assert values["pids.max"] == str(cgroups.DEFAULT_PIDS_LIMIT)


async def test_memory_limit_kills_the_hog_not_pid_1(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        await runtime.create(spec(memory_mib=32))
        await runtime.start("env_a")
        hog = await runtime.exec("env_a", ["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"], timeout=60)
        assert hog.exit_code == 128 + signal.SIGKILL
        assert (await runtime.inspect("env_a")).state is ContainerState.RUNNING  # type: ignore[union-attr]
        assert (await runtime.exec("env_a", ["echo", "alive"])).stdout == b"alive\n"


async def test_fork_bomb_stops_at_the_pids_limit(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host, pids_limit=64) as runtime:
        await runtime.create(spec())
        await runtime.start("env_a")
        bomb = await runtime.open_exec(
            "env_a", ExecRequest(argv=["sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 5"])
        )
        bomb.stdin.close()
        try:
            await asyncio.sleep(2)
            # The host still runs things, and so does the environment, within its limit.
            true = await asyncio.create_subprocess_exec("true")
            assert await asyncio.wait_for(true.wait(), 10) == 0
            [pids] = [
                d for d in cgroups.environment_cgroups(runtime_host.cgroup_parent, "env_a") if (d / "pids.max").exists()
            ]
            assert int((pids / "pids.current").read_text()) <= 64
            assert "max 0" not in (pids / "pids.events").read_text()  # the limit refused forks
        finally:
            await bomb.signal(signal.SIGKILL)
        await runtime.delete("env_a")  # runc freezes the group and kills them all
        assert cgroups.environment_cgroups(runtime_host.cgroup_parent, "env_a") == []


async def test_stop_kills_what_ignores_sigterm_after_the_timeout(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        await runtime.create(spec(image="busybox-stubborn"))
        await runtime.start("env_a")
        stopped = await runtime.stop("env_a", timeout=0.5)
        assert (stopped.state, stopped.exit_code) == (ContainerState.STOPPED, 128 + signal.SIGKILL)
        assert runtime_host.mounts() == []


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from runner.linux.busybox_image import BusyboxImages
    from devyard.runner.images.image import IdRange
    from devyard.runner.linux.runtime import LinuxRuntime
    from devyard.runner.runtime import ContainerSpec

    async def main():
        images = BusyboxImages(Path({layer!r}), IdRange())
        runtime = LinuxRuntime(Path({state!r}), images=images, cgroup_parent={parent!r})
        await runtime.create(ContainerSpec(environment_id="env_a", image="busybox"))
        await runtime.start("env_a")
        print("started", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_a_new_runtime_adopts_a_container_whose_runner_was_killed(runtime_host: RuntimeHost) -> None:
    source = CHILD.format(
        tests=str(TESTS_DIR),
        state=str(runtime_host.state_dir),
        layer=str(runtime_host.layer),
        parent=runtime_host.cgroup_parent,
    )
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", source, stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 60) == b"started\n"
    finally:
        child.kill()
        await child.wait()
    async with running_runtime(runtime_host) as runtime:
        [status] = await runtime.list()
        assert (status.environment_id, status.state) == ("env_a", ContainerState.RUNNING)
        assert await runtime.repair() == []
        assert (await runtime.exec("env_a", ["echo", "adopted"])).stdout == b"adopted\n"
        assert (await runtime.stop("env_a")).exit_code == 0


def unused_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.233.0.0/16 that no route of the host overlaps."""
    output = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True)
    routes = [
        ipaddress.IPv4Network(route["dst"], strict=False)
        for route in json.loads(output.stdout or "[]")
        if route.get("dst") not in (None, "default")
    ]
    candidates = list(ipaddress.IPv4Network("10.233.0.0/16").subnets(new_prefix=24))
    random.shuffle(candidates)
    return next(c for c in candidates if not any(c.overlaps(r) for r in routes if r.prefixlen > 0))


async def test_a_container_joins_the_network_of_its_environment(runtime_host: RuntimeHost) -> None:
    host.require("runc", "ip", "nft", "unshare")
    bridge = f"dyr{secrets.token_hex(3)}"
    network = Network(
        runtime_host.base / "network",
        subnet=str(unused_subnet()),
        bridge=bridge,
        netns_dir=runtime_host.base / "netns",
    )
    try:
        async with running_runtime(runtime_host, network=network) as runtime:
            await runtime.create(spec(labels={"devyard.io/name": "net box"}))
            await runtime.start("env_a")
            [attachment] = await network.attachments()
            result = await runtime.exec(
                "env_a", ["sh", "-c", "cat /etc/resolv.conf; echo --; cat /etc/hosts; ip -o -4 addr"]
            )
            resolv_conf, _, rest = result.stdout.decode().partition("--\n")
            assert resolv_conf == attachment.resolv_conf
            hosts, addresses = rest[: len(attachment.hosts)], rest[len(attachment.hosts) :]
            assert hosts == attachment.hosts
            assert f"inet {attachment.address}/" in addresses
            assert await runtime.orphans() == []

            await runtime.stop("env_a")
            assert await network.attachments() == []  # a stopped environment holds no address
            await runtime.start("env_a")
            [attachment] = await network.attachments()
            result = await runtime.exec("env_a", ["sh", "-c", "ls /sys/class/net; ip -o -4 addr show eth0"])
            assert result.stdout.split()[:2] == [b"eth0", b"lo"]
            assert f"inet {attachment.address}/".encode() in result.stdout
            assert await runtime.orphans() == []

            await runtime.delete("env_a")
            assert await network.attachments() == []
            assert await runtime.orphans() == []
    finally:
        await network.teardown()
        await asyncio.to_thread(subprocess.run, ["ip", "link", "del", bridge], capture_output=True, check=False)


async def test_user_lookup_never_follows_a_symlink_out_of_the_container(runtime_host: RuntimeHost) -> None:
    planted = runtime_host.base / "planted-passwd"
    planted.write_text("evil:x:4242:4242::/:/bin/sh\n")
    async with running_runtime(runtime_host) as runtime:
        await runtime.create(spec())
        await runtime.start("env_a")
        for target in (str(planted), f"../../../../../../../..{planted}"):
            link = await runtime.exec("env_a", ["ln", "-sfn", target, "/etc/passwd"])
            assert link.exit_code == 0
            with pytest.raises(PermanentError, match="no user 'evil'"):
                await runtime.open_exec("env_a", ExecRequest(argv=["id"], user="evil"))
        # Inside the container the same names resolve inside it.
        await runtime.exec(
            "env_a", ["sh", "-c", "echo 'evil:x:4243:4243::/:/bin/sh' > /etc/evil; ln -sfn evil /etc/passwd"]
        )
        process = await runtime.open_exec("env_a", ExecRequest(argv=["id", "-u"], user="evil"))
        process.stdin.close()
        assert await process.stdout.read() == b"4243\n"


async def test_orphans_are_reported_and_repair_removes_them(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        await runtime.create(spec())
        await runtime.start("env_a")
        ghost_groups = [h / runtime_host.cgroup_parent / "env_ghost" for h in cgroups.hierarchies()[:2]]
        for group in ghost_groups:
            group.mkdir(parents=True)
        (runtime_host.state_dir / "environments" / "env_half" / "upper").mkdir(parents=True)

        found = await runtime.orphans()
        assert any("env_half" in line for line in found)
        assert sum("env_ghost" in line for line in found) == len(ghost_groups)
        assert not any("env_a" in line for line in found)  # the running one is explained by its record

        fixed = await runtime.repair()
        assert any("env_half" in line for line in fixed) and any("env_ghost" in line for line in fixed)
        assert await runtime.orphans() == []
        assert not any(group.exists() for group in ghost_groups)
        assert (await runtime.inspect("env_a")).state is ContainerState.RUNNING  # type: ignore[union-attr]


async def test_progress_of_a_slow_create(runtime_host: RuntimeHost) -> None:
    release = asyncio.Event()

    class SlowImages(BusyboxImages):
        async def prepare(
            self,
            reference: str,
            *,
            holder: str,
            progress: ProgressCallback | None = None,
            credentials: Mapping[str, tuple[str, str]] | None = None,
        ) -> Prepared:
            assert progress is not None
            progress(
                Progress(reference, fetched=1_000_000, total=2_000_000, layers_done=0, layers_total=1, step="fetch")
            )
            await release.wait()
            return await super().prepare(reference, holder=holder, progress=progress)

    async with running_runtime(runtime_host) as runtime:
        runtime.images = SlowImages(runtime_host.layer, ID_RANGE)
        assert runtime.progress("env_a") is None
        creating = asyncio.create_task(runtime.create(spec()))
        await asyncio.sleep(0.1)
        assert runtime.progress("env_a") == "pulling busybox: 1.0 of 2.0 MB"
        release.set()
        assert (await creating).state is ContainerState.CREATED
        assert runtime.progress("env_a") is None
