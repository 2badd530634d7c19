"""The runner against the real management plane: the app in this process on a free port (``server`` from
``tests/conftest.py``: SQLite, and PostgreSQL where it is installed), an ``Agent`` with the fake runtime.

Registration with an exchange token, scheduling, running, stopping, deleting until 404, and a server restart
in the middle: the runner keeps its environments meanwhile, reconnects, lists again and carries on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from devyard.client import ApiError, AsyncClient
from devyard.runner.agent import Agent
from devyard.runner.environments import READY
from devyard.runner.fake_runtime import FakeRuntime
from devyard.runner.runtime import ContainerState
from devyard.wire.environments import Environment, EnvironmentPhase
from devyard.wire.meta import ConditionStatus
from devyard.wire.runners import Runner, RunnerCreated, RunnerPhase
from support.live_server import LiveServer

from .conftest import FAST_RETRY, fast_settings, holds, running


async def wait_for_environment(
    client: AsyncClient, env_id: str, phase: EnvironmentPhase, *, timeout: float = 20.0
) -> Environment:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        environment = Environment.model_validate(await client.get(f"/api/v1/environments/{env_id}"))
        if environment.status.phase is phase:
            return environment
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{env_id} is {environment.status.phase} ({environment.status.message}), not {phase}")
        await asyncio.sleep(0.05)


async def wait_until_gone(client: AsyncClient, env_id: str, *, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await client.get(f"/api/v1/environments/{env_id}")
        except ApiError as exc:
            assert exc.status == 404
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{env_id} is still there")
        await asyncio.sleep(0.05)


async def wait_for_runner_online(client: AsyncClient, runner_id: str, *, timeout: float = 20.0) -> Runner:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        runner = Runner.model_validate(await client.get(f"/api/v1/runners/{runner_id}"))
        if runner.status.phase is RunnerPhase.ONLINE:
            return runner
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"runner {runner_id} is {runner.status.phase}, not online")
        await asyncio.sleep(0.05)


def container_state(agent: Agent, env_id: str) -> ContainerState | None:
    assert isinstance(agent.runtime, FakeRuntime)
    container = agent.runtime._containers.get(env_id)
    return None if container is None else container.state


async def test_runner_lifecycle_against_the_real_server(server: LiveServer, tmp_path: Path) -> None:
    async with AsyncClient(server.url, server.admin_token, retry=FAST_RETRY) as admin:
        created = RunnerCreated.model_validate(await admin.post("/api/v1/runners", {"metadata": {"name": "e2e"}}))
        runner_id = created.runner.metadata.id
        await admin.post(
            "/api/v1/environment-classes",
            {"metadata": {"name": "small"}, "spec": {"cpu": 1.5, "memory_mib": 2048, "default": True}},
        )
        settings = fast_settings(
            tmp_path / "runner", server=server.url, token=created.exchange_token, heartbeat_interval=0.5
        )
        agent = Agent(settings, retry=FAST_RETRY, stop_grace=5)
        async with running(agent):
            await asyncio.wait_for(agent.wait_synced(), timeout=20)
            assert agent.runner_id == runner_id
            runner = await wait_for_runner_online(admin, runner_id)
            assert (runner.status.runtime, runner.status.capacity) == ("fake", 100)

            body: dict[str, Any] = {"spec": {"env": {"APP": "1"}}}
            env_id = Environment.model_validate(await admin.post("/api/v1/environments", body)).metadata.id
            environment = await wait_for_environment(admin, env_id, EnvironmentPhase.RUNNING)
            assert environment.status.runner_id == runner_id
            assert environment.status.observed_generation == environment.metadata.generation
            assert {"schedule", "create", "start"} <= set(environment.status.timings)
            ready = next(c for c in environment.status.conditions if c.type == READY)
            assert ready.status is ConditionStatus.TRUE
            assert {c.type for c in environment.status.conditions} >= {"Scheduled", READY}
            assert isinstance(agent.runtime, FakeRuntime)
            container = agent.runtime._containers[env_id]
            assert (container.spec.cpu, container.spec.memory_mib) == (1.5, 2048)

            await admin.patch(f"/api/v1/environments/{env_id}", {"spec": {"desired_phase": "stopped"}})
            environment = await wait_for_environment(admin, env_id, EnvironmentPhase.STOPPED)
            assert environment.status.observed_generation == environment.metadata.generation
            assert container_state(agent, env_id) is ContainerState.STOPPED

            # The server goes away: the runner keeps its environment as it is, then reconnects and relists.
            assert agent.informer is not None
            lists = agent.informer.lists
            await asyncio.to_thread(server.stop)
            await holds(
                lambda: container_state(agent, env_id) is ContainerState.STOPPED,
                duration=1.0,
                what="the container as it was",
            )
            assert not agent.synced
            await asyncio.to_thread(server.start)
            await asyncio.wait_for(agent.wait_synced(), timeout=20)
            assert agent.informer.lists > lists

            # The watch works again: start it, then delete it until the server forgets it.
            await admin.patch(f"/api/v1/environments/{env_id}", {"spec": {"desired_phase": "running"}})
            await wait_for_environment(admin, env_id, EnvironmentPhase.RUNNING)
            assert container_state(agent, env_id) is ContainerState.RUNNING

            await admin.delete(f"/api/v1/environments/{env_id}")
            await wait_until_gone(admin, env_id)
            assert container_state(agent, env_id) is None
