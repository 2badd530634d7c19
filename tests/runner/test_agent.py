"""The agent against a fake server: registration and credential, heartbeat, the whole lifecycle through list
and watch, a server that goes away and comes back, relisting on 410, adoption after a restart."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest

from devyard.runner.agent import Agent
from devyard.runner.errors import CredentialError
from devyard.runner.fake_runtime import FakeRuntime, FakeRuntimeConfig
from devyard.runner.runtime import ContainerSpec, ContainerState
from devyard.wire.environments import DesiredPhase, EnvironmentPhase

from .conftest import FAST_RETRY, eventually, fast_settings, holds, running
from .fake_server import FakeServer


def make_agent(server: FakeServer, state_dir: Path, token: str | None = None, **changes: object) -> Agent:
    runtime = changes.pop("runtime", None)
    settings = fast_settings(state_dir, token=token, **changes)
    return Agent(
        settings,
        runtime=runtime,  # type: ignore[arg-type]
        transport=server.transport(),
        retry=FAST_RETRY,
        stop_grace=2,
    )


def container_state(agent: Agent, environment_id: str) -> ContainerState | None:
    assert isinstance(agent.runtime, FakeRuntime)
    container = agent.runtime._containers.get(environment_id)
    return None if container is None else container.state


async def test_registers_once_and_keeps_its_credential(fake_server: FakeServer, tmp_path: Path) -> None:
    runner_id, token = fake_server.create_runner()
    agent = make_agent(fake_server, tmp_path, token)
    async with running(agent):
        await eventually(lambda: fake_server.heartbeats.get(runner_id, 0) >= 2, what="heartbeats")
    assert agent.runner_id == runner_id
    status = fake_server.runner_status[runner_id]
    assert (status.runtime, status.hostname, status.capacity) == ("fake", "test-host", 100)
    path = tmp_path / "credential.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["runner_id"] == runner_id

    # The token is spent; a restart uses the stored credential (and ignores the token it is given again).
    again = make_agent(fake_server, tmp_path, token)
    beats = fake_server.heartbeats[runner_id]
    async with running(again):
        await eventually(lambda: fake_server.heartbeats[runner_id] > beats, what="a heartbeat after restart")
    assert again.runner_id == runner_id


async def test_a_refused_exchange_token_stops_the_agent(fake_server: FakeServer, tmp_path: Path) -> None:
    agent = make_agent(fake_server, tmp_path, "ex_not-a-token")
    with pytest.raises(CredentialError):
        await asyncio.wait_for(agent.run(), timeout=5)
    assert not (tmp_path / "credential.json").exists()


async def test_wait_synced_fails_when_the_agent_cannot_start(fake_server: FakeServer, tmp_path: Path) -> None:
    agent = make_agent(fake_server, tmp_path, "ex_not-a-token")
    task = asyncio.create_task(agent.run())
    with pytest.raises(RuntimeError, match="stopped before"):
        await asyncio.wait_for(agent.wait_synced(), timeout=5)
    with pytest.raises(CredentialError):
        await task


async def test_no_token_and_no_credential_is_an_error(fake_server: FakeServer, tmp_path: Path) -> None:
    with pytest.raises(CredentialError):
        await asyncio.wait_for(make_agent(fake_server, tmp_path).run(), timeout=5)


async def test_lifecycle_through_the_watch(fake_server: FakeServer, tmp_path: Path) -> None:
    runner_id, token = fake_server.create_runner()
    agent = make_agent(fake_server, tmp_path, token)
    async with running(agent):
        await agent.wait_synced()
        env_id = fake_server.create_environment(runner_id)
        await eventually(lambda: fake_server.phase(env_id) is EnvironmentPhase.RUNNING, what="running")
        assert container_state(agent, env_id) is ContainerState.RUNNING

        fake_server.set_desired(env_id, DesiredPhase.STOPPED)
        await eventually(lambda: fake_server.phase(env_id) is EnvironmentPhase.STOPPED, what="stopped")
        assert container_state(agent, env_id) is ContainerState.STOPPED
        assert fake_server.environments[env_id].status.observed_generation == 2

        fake_server.set_desired(env_id, DesiredPhase.RUNNING)
        await eventually(lambda: fake_server.phase(env_id) is EnvironmentPhase.RUNNING, what="running again")

        fake_server.delete_environment(env_id)
        await eventually(lambda: env_id not in fake_server.environments, what="deleted")
        assert container_state(agent, env_id) is None

        # Quiet environments cost no status writes, even across several resyncs.
        other = fake_server.create_environment(runner_id)
        await eventually(lambda: fake_server.phase(other) is EnvironmentPhase.RUNNING, what="running")
        writes = fake_server.status_writes[other]
        await asyncio.sleep(3 * agent.settings.resync_interval)
        assert fake_server.status_writes[other] == writes


async def test_many_environments_converge_despite_random_failures(fake_server: FakeServer, tmp_path: Path) -> None:
    runner_id, token = fake_server.create_runner()
    runtime = FakeRuntime(FakeRuntimeConfig(failure_rate=0.3, seed=1, delays={"create": 0.01, "start": 0.01}))
    agent = make_agent(fake_server, tmp_path, token, runtime=runtime, workers=8)
    async with running(agent):
        ids = [fake_server.create_environment(runner_id) for _ in range(40)]
        await eventually(
            lambda: all(fake_server.phase(i) is EnvironmentPhase.RUNNING for i in ids), timeout=20, what="all running"
        )
        for env_id in ids[:20]:
            fake_server.set_desired(env_id, DesiredPhase.DELETED)
        for env_id in ids[20:]:
            fake_server.set_desired(env_id, DesiredPhase.STOPPED)
        await eventually(
            lambda: (
                all(fake_server.phase(i) is EnvironmentPhase.STOPPED for i in ids[20:])
                and not any(i in fake_server.environments for i in ids[:20])
            ),
            timeout=20,
            what="stopped and deleted",
        )
    assert sorted(c.environment_id for c in await runtime.list()) == sorted(ids[20:])
    assert all(fake_server.environments[i].status.observed_generation == 2 for i in ids[20:])


async def test_keeps_everything_while_the_server_is_away_then_resyncs(fake_server: FakeServer, tmp_path: Path) -> None:
    runner_id, token = fake_server.create_runner()
    agent = make_agent(fake_server, tmp_path, token)
    async with running(agent):
        kept, removed, stopped = (fake_server.create_environment(runner_id) for _ in range(3))
        await eventually(
            lambda: all(fake_server.phase(i) is EnvironmentPhase.RUNNING for i in (kept, removed, stopped)),
            what="running",
        )
        lists = agent.informer.lists if agent.informer else 0

        fake_server.go_down()
        await eventually(lambda: not agent.synced, what="the agent to notice")
        # Meanwhile, on the server: one is removed outright, one is to stop. The runner cannot know yet.
        fake_server.remove_environment(removed)
        fake_server.set_desired(stopped, DesiredPhase.STOPPED)
        await holds(
            lambda: all(container_state(agent, i) is ContainerState.RUNNING for i in (kept, removed, stopped)),
            duration=3 * agent.settings.resync_interval,
            what="every container running as it was",
        )

        fake_server.come_back()
        await eventually(lambda: agent.synced, what="the agent to list again")
        assert agent.informer is not None
        assert agent.informer.lists > lists
        await eventually(lambda: container_state(agent, removed) is None, what="the removed one gone")
        await eventually(lambda: fake_server.phase(stopped) is EnvironmentPhase.STOPPED, what="stopped")
        assert container_state(agent, kept) is ContainerState.RUNNING


async def test_relists_when_the_watch_is_too_old(fake_server: FakeServer, tmp_path: Path) -> None:
    runner_id, token = fake_server.create_runner()
    agent = make_agent(fake_server, tmp_path, token)
    async with running(agent):
        await agent.wait_synced()
        assert agent.informer is not None
        lists = agent.informer.lists
        fake_server.forget_history()
        await eventually(lambda: agent.informer is not None and agent.informer.lists > lists, what="a relist")
        env_id = fake_server.create_environment(runner_id)
        await eventually(lambda: fake_server.phase(env_id) is EnvironmentPhase.RUNNING, what="running")


async def test_a_restarted_runner_adopts_its_containers_and_removes_the_unwanted(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    runner_id, token = fake_server.create_runner()
    agent = make_agent(fake_server, tmp_path, token)
    async with running(agent):
        kept = fake_server.create_environment(runner_id)
        gone = fake_server.create_environment(runner_id)
        await eventually(
            lambda: all(fake_server.phase(i) is EnvironmentPhase.RUNNING for i in (kept, gone)), what="running"
        )
    assert (tmp_path / "fake-runtime.json").exists()
    before = FakeRuntime(state_file=tmp_path / "fake-runtime.json")._containers[kept]

    fake_server.remove_environment(gone)  # while the runner is down
    again = make_agent(fake_server, tmp_path)  # no token: the credential is kept
    async with running(again):
        await eventually(lambda: container_state(again, gone) is None, what="the unwanted container removed")
        assert isinstance(again.runtime, FakeRuntime)
        adopted = again.runtime._containers[kept]
        assert adopted.state is ContainerState.RUNNING
        assert adopted.created_at == before.created_at  # the same container, not a new one
        assert adopted.started_at == before.started_at


async def test_a_reassigned_environment_loses_its_container(fake_server: FakeServer, tmp_path: Path) -> None:
    runner_id, token = fake_server.create_runner()
    other_runner, _ = fake_server.create_runner()
    agent = make_agent(fake_server, tmp_path, token)
    async with running(agent):
        env_id = fake_server.create_environment(runner_id)
        await eventually(lambda: fake_server.phase(env_id) is EnvironmentPhase.RUNNING, what="running")
        fake_server.reassign(env_id, other_runner)
        await eventually(lambda: container_state(agent, env_id) is None, what="the container removed")


async def test_drift_on_the_host_is_corrected_by_the_resync(fake_server: FakeServer, tmp_path: Path) -> None:
    runner_id, token = fake_server.create_runner()
    agent = make_agent(fake_server, tmp_path, token)
    async with running(agent):
        env_id = fake_server.create_environment(runner_id)
        await eventually(lambda: fake_server.phase(env_id) is EnvironmentPhase.RUNNING, what="running")
        assert isinstance(agent.runtime, FakeRuntime)
        agent.runtime.simulate_exit(env_id)
        await agent.runtime.create(ContainerSpec(environment_id="env_stray", image="x"))
        await eventually(lambda: container_state(agent, env_id) is ContainerState.RUNNING, what="restarted")
        await eventually(lambda: container_state(agent, "env_stray") is None, what="the stray removed")
