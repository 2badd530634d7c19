"""The fake runtime keeps the Runtime protocol's promises: idempotent steps, delays through its clock, injected
failures, a canned exec, and containers that outlive the runner through its state file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from devyard.runner.clock import FakeClock
from devyard.runner.errors import ContainerNotFound, ContainerNotRunning, PermanentError, TemporaryError
from devyard.runner.fake_runtime import FakeRuntime, FakeRuntimeConfig
from devyard.runner.runtime import ContainerSpec, ContainerState

SPEC = ContainerSpec(environment_id="env_a", image="debian:stable", env={"A": "1"}, cpu=2.0, labels={"k": "v"})


async def test_steps_are_idempotent() -> None:
    runtime = FakeRuntime()
    created = await runtime.create(SPEC)
    assert created.state is ContainerState.CREATED
    assert await runtime.create(SPEC) == created
    started = await runtime.start("env_a")
    assert started.state is ContainerState.RUNNING
    assert await runtime.start("env_a") == started
    stopped = await runtime.stop("env_a")
    assert (stopped.state, stopped.exit_code) == (ContainerState.STOPPED, 0)
    assert await runtime.stop("env_a") == stopped
    await runtime.delete("env_a")
    await runtime.delete("env_a")
    assert await runtime.inspect("env_a") is None
    assert await runtime.list() == []
    with pytest.raises(ContainerNotFound):
        await runtime.start("env_a")


async def test_exec_is_canned_and_needs_a_running_container() -> None:
    runtime = FakeRuntime()
    await runtime.create(SPEC)
    with pytest.raises(ContainerNotRunning):
        await runtime.exec("env_a", ["true"])
    await runtime.start("env_a")
    result = await runtime.exec("env_a", ["echo", "hello world"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"echo 'hello world'\n", b"")


async def test_delays_go_through_the_clock_and_pull_happens_once_per_image() -> None:
    clock = FakeClock()
    runtime = FakeRuntime(FakeRuntimeConfig(delays={"pull": 5, "create": 1, "start": 2}), clock=clock)
    creating = asyncio.create_task(runtime.create(SPEC))
    await clock.advance(5.5)
    assert not creating.done()
    await clock.advance(0.5)
    created = await creating
    assert created.timings == {"pull": 5, "create": 1}

    creating = asyncio.create_task(runtime.create(ContainerSpec(environment_id="env_b", image="debian:stable")))
    await clock.advance(1)
    assert (await creating).timings == {"create": 1}


async def test_fail_next_then_succeed() -> None:
    runtime = FakeRuntime()
    runtime.fail_next("create", times=2)
    runtime.fail_next("create", permanent=True, message="bad image")
    for _ in range(2):
        with pytest.raises(TemporaryError):
            await runtime.create(SPEC)
    with pytest.raises(PermanentError, match="bad image"):
        await runtime.create(SPEC)
    assert (await runtime.create(SPEC)).state is ContainerState.CREATED


async def test_random_failures_follow_the_rate_and_kind() -> None:
    runtime = FakeRuntime(FakeRuntimeConfig(failure_rate=1.0, failure_permanent=True))
    with pytest.raises(PermanentError):
        await runtime.create(SPEC)
    assert await runtime.list() == []  # list is not among the failing operations by default
    never = FakeRuntime(FakeRuntimeConfig(failure_rate=0.0))
    await never.create(SPEC)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        FakeRuntimeConfig(delays={"teleport": 1})
    with pytest.raises(ValueError, match="failure_rate"):
        FakeRuntimeConfig(failure_rate=2)


async def test_containers_outlive_the_runtime_through_the_state_file(tmp_path: Path) -> None:
    path = tmp_path / "fake-runtime.json"
    first = FakeRuntime(state_file=path)
    await first.create(SPEC)
    running = await first.start("env_a")
    await first.create(ContainerSpec(environment_id="env_b", image="alpine"))
    await first.close()

    second = FakeRuntime(state_file=path)
    assert await second.inspect("env_a") == running
    assert sorted(c.environment_id for c in await second.list()) == ["env_a", "env_b"]
    await second.delete("env_b")
    assert [c.environment_id for c in await FakeRuntime(state_file=path).list()] == ["env_a"]


async def test_a_damaged_state_file_is_an_error_not_a_clean_slate(tmp_path: Path) -> None:
    path = tmp_path / "fake-runtime.json"
    path.write_text("{not json")
    with pytest.raises(PermanentError, match="cannot read"):
        FakeRuntime(state_file=path)
