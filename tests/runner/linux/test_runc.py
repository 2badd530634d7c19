"""``runc.read_state`` against ``runc state`` itself, on a real container through its whole life: what the runner
reads from runc's state file must be what runc would have answered (status, pid, bundle)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import pytest

from devyard.runner.linux import runc
from devyard.runner.linux.runc import ContainerInfo, read_state
from devyard.runner.runtime import ContainerSpec

from .runtime_host import RuntimeHost, busybox_layer_fixture, running_runtime, runtime_host_fixture  # noqa: F401  (fixtures)


def runc_says(where: RuntimeHost, container_id: str) -> ContainerInfo | None:
    answer = subprocess.run(
        ["runc", "--root", str(where.state_dir / "runc"), "state", container_id], capture_output=True, text=True
    )
    if answer.returncode != 0:
        assert "not exist" in answer.stderr, answer.stderr
        return None
    return ContainerInfo.from_json(json.loads(answer.stdout))


def run_runc(where: RuntimeHost, *arguments: str) -> None:
    subprocess.run(["runc", "--root", str(where.state_dir / "runc"), *arguments], check=True)


def both(where: RuntimeHost, container_id: str) -> tuple[ContainerInfo | None, ContainerInfo | None]:
    return read_state(where.state_dir / "runc", container_id), runc_says(where, container_id)


async def test_the_state_file_says_what_runc_state_says_through_a_containers_life(runtime_host: RuntimeHost) -> None:
    root = runtime_host.state_dir / "runc"
    async with running_runtime(runtime_host) as runtime:
        assert both(runtime_host, "env_never") == (None, None)

        await runtime.create(ContainerSpec(environment_id="env_a", image="busybox"))
        read, said = both(runtime_host, "env_a")
        assert said is not None and said.status == "created" and said.pid > 0
        assert read == said

        await runtime.start("env_a")
        read, said = both(runtime_host, "env_a")
        assert said is not None and said.status == "running"
        assert read == said

        run_runc(runtime_host, "pause", "env_a")
        try:
            read, said = both(runtime_host, "env_a")
            assert said is not None and said.status == "paused"
            assert read == said
        finally:
            run_runc(runtime_host, "resume", "env_a")

        # PID 1 killed behind runc's back: stopped, pid 0, as runc reports it.
        os.kill(said.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (read := read_state(root, "env_a")) is not None and read.status != "stopped":
            assert time.monotonic() < deadline, read
            await asyncio.sleep(0.05)
        assert read == runc_says(runtime_host, "env_a")
        assert read is not None and read.pid == 0

        await runtime.delete("env_a")
        assert both(runtime_host, "env_a") == (None, None)


def test_a_file_it_does_not_understand_is_left_to_runc(runtime_host: RuntimeHost) -> None:
    root = runtime_host.state_dir / "runc"
    (root / "env_odd").mkdir(parents=True)
    (root / "env_odd" / "state.json").write_text('{"id": "env_odd"}')
    # Runc.state then runs ``runc state`` instead.
    with pytest.raises(runc._UnknownState, match="env_odd"):
        read_state(root, "env_odd")
