"""Crash safety of the linux runtime: a runner killed (SIGKILL, with the runc processes it was running) at a
random point of create, start, exec, stop or delete leaves a host that ``repair`` brings back to a state some
step left on purpose, with nothing ``orphans`` would report, and on which the next steps work.

The runner is a child process looping over the lifecycle; the test kills its whole process group after a random
delay, as a crash or ``systemctl kill`` would (the containers' own processes are not in that group: runc's
init calls setsid). The seed is in the test's output, so a failure can be replayed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from devyard.runner.linux import cgroups
from devyard.runner.runtime import ContainerSpec, ContainerState

from .runtime_host import RuntimeHost, busybox_layer_fixture, running_runtime, runtime_host_fixture  # noqa: F401

TESTS_DIR = Path(__file__).resolve().parents[2]

RUNNER = textwrap.dedent(
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
        runtime = LinuxRuntime(Path({state!r}), images=images, cgroup_parent={parent!r}, stop_timeout=5)
        spec = ContainerSpec(environment_id="env_a", image="busybox")
        while True:
            await runtime.create(spec)
            await runtime.start("env_a")
            await runtime.exec("env_a", ["sh", "-c", "date >> /root/log"])
            await runtime.stop("env_a")
            await runtime.start("env_a")
            await runtime.stop("env_a")
            await runtime.delete("env_a")

    asyncio.run(main())
    """
)


def host_leftovers(where: RuntimeHost, live: set[str]) -> list[str]:
    """Mounts, cgroups and runc containers that belong to no live container (``live``: ids runc runs or holds
    created); a stopped environment keeps only files."""
    found: list[str] = []
    environments = where.state_dir / "environments"
    for line in where.mounts():
        mount_point = Path(line.split(" ")[4])
        if mount_point.parent.name not in live or mount_point.name != "rootfs":
            found.append(f"mount {mount_point}")
    for environment_id, directories in cgroups.leftover_cgroups(where.cgroup_parent).items():
        if environment_id not in live:
            found += [f"cgroup {directory}" for directory in directories]
    for container in where.runc_containers():
        if not (environments / container / "record.json").exists():
            found.append(f"runc container {container}")
    return found


@pytest.mark.slow
async def test_repair_after_a_runner_killed_at_random_points(runtime_host: RuntimeHost) -> None:
    seed = int(os.environ.get("DEVYARD_TEST_SEED") or random.randrange(1 << 30))
    print(f"seed {seed}")
    chance = random.Random(seed)
    source = RUNNER.format(
        tests=str(TESTS_DIR),
        state=str(runtime_host.state_dir),
        layer=str(runtime_host.layer),
        parent=runtime_host.cgroup_parent,
    )
    spec = ContainerSpec(environment_id="env_a", image="busybox")
    for _round in range(8):
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", source, start_new_session=True)
        await asyncio.sleep(chance.uniform(0.05, 1.5))
        assert child.returncode is None, "the runner failed by itself; its traceback is in the output"
        os.killpg(child.pid, signal.SIGKILL)
        await child.wait()

        async with running_runtime(runtime_host, stop_timeout=5) as runtime:
            print("repair:", await asyncio.wait_for(runtime.repair(), 60))
            assert await runtime.orphans() == []
            live = {s.environment_id for s in await runtime.list() if s.state is not ContainerState.STOPPED}
            live &= set(await asyncio.to_thread(runtime_host.runc_containers))
            assert host_leftovers(runtime_host, live) == []
            assert await runtime.repair() == []  # nothing left to do

            # The next steps work from whatever state the crash left.
            await asyncio.wait_for(runtime.create(spec), 60)
            assert (await asyncio.wait_for(runtime.start("env_a"), 60)).state is ContainerState.RUNNING
            assert (await runtime.exec("env_a", ["echo", "ok"], timeout=60)).stdout == b"ok\n"
            if chance.random() < 0.5:
                await asyncio.wait_for(runtime.stop("env_a"), 60)
            # Keep the environment for the next round: leave running_runtime without deleting it.
            runtime.list = _nothing  # type: ignore[method-assign]

    async with running_runtime(runtime_host) as runtime:
        await runtime.delete("env_a")
        assert await runtime.orphans() == []
    assert host_leftovers(runtime_host, set()) == []
    assert not (runtime_host.state_dir / "environments" / "env_a").exists()


async def _nothing() -> list[object]:
    return []
