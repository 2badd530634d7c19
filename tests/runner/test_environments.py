"""The environment reconciler against the fake runtime and a fake server: it converges to the desired phase,
reports observed_generation, recovers from temporary failures, reports permanent ones, and removes only
what a synced cache says is gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devyard.client import AsyncClient
from devyard.runner import credentials
from devyard.runner.activity import Activity
from devyard.runner.controller import Controller
from devyard.runner.environments import READY, EnvironmentReconciler
from devyard.runner.errors import PermanentError, TemporaryError
from devyard.runner.fake_runtime import FakeRuntime
from devyard.runner.informer import Informer
from devyard.runner.runtime import ContainerSpec, ContainerState
from devyard.runner.workqueue import WorkQueue
from devyard.wire.environments import DesiredPhase, Environment, EnvironmentPhase
from devyard.wire.meta import ConditionStatus

from .conftest import FAKE_URL, FAST_RETRY, eventually
from .fake_server import FakeServer


@dataclass
class World:
    server: FakeServer
    runtime: FakeRuntime
    informer: Informer[Environment]
    reconciler: EnvironmentReconciler
    controller: Controller
    queue: WorkQueue
    runner_id: str
    activity: Activity

    async def seen(self, environment_id: str) -> Environment:
        """Wait until the informer has the server's current version of the environment."""
        wanted = self.server.environments[environment_id].metadata.resource_version

        def current() -> bool:
            cached = self.informer.get(environment_id)
            return cached is not None and cached.metadata.resource_version == wanted

        await eventually(current, what=f"the informer to see {environment_id}")
        cached = self.informer.get(environment_id)
        assert cached is not None
        return cached

    async def converge(self, environment_id: str, rounds: int = 10) -> None:
        """Reconcile until the status stops changing, as the controller would after each failure."""
        for _ in range(rounds):
            await self.controller.execute(environment_id)

    async def state(self, environment_id: str) -> ContainerState | None:
        container = await self.runtime.inspect(environment_id)
        return None if container is None else container.state

    def status(self, environment_id: str) -> Environment:
        return self.server.environments[environment_id]


@pytest.fixture
async def world(fake_server: FakeServer, tmp_path: Path) -> AsyncIterator[World]:
    server = fake_server
    runner_id, token = server.create_runner()
    transport = server.transport()
    credential = await credentials.obtain(
        tmp_path / "credential.json",
        server=FAKE_URL,
        exchange_token=token,
        transport=transport,
    )
    client = AsyncClient(FAKE_URL, credential.token, transport=transport, retry=FAST_RETRY)
    runtime = FakeRuntime()
    queue = WorkQueue()
    informer: Informer[Environment] = Informer(
        client,
        "/api/v1/environments",
        Environment,
        params={"runner_id": runner_id},
        owns=lambda e: e.status.runner_id == runner_id,
        on_change=lambda key: None,  # these tests reconcile by hand
        bookmark_interval=0.2,
    )
    activity = Activity(queue.add)
    reconciler = EnvironmentReconciler(
        client=client, runtime=runtime, informer=informer, default_image="debian:stable", activity=activity
    )
    controller = Controller(reconciler, queue, workers=1)
    task = asyncio.create_task(informer.run())
    await informer.wait_synced()
    world = World(server, runtime, informer, reconciler, controller, queue, runner_id, activity)
    try:
        yield world
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await queue.shutdown()
        await client.aclose()


async def test_activity_through_the_gateways_is_reported_as_last_activity_at(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id, image="ghcr.io/acme/dev:1")
    await world.seen(env_id)
    await world.reconciler.reconcile(env_id)
    assert world.status(env_id).status.last_activity_at is None  # nobody used it yet

    world.activity.touch(env_id)
    assert len(world.queue) == 1  # the first touch asks for a report
    world.queue.done(await world.queue.get())
    await world.seen(env_id)
    await world.reconciler.reconcile(env_id)
    reported = world.status(env_id).status.last_activity_at
    assert reported is not None
    assert reported.timestamp() == pytest.approx(world.activity.last(env_id) or 0, abs=0.001)

    # Within the report granularity a touch is recorded but asks for nothing; the next reconcile carries it.
    world.activity.touch(env_id)
    assert len(world.queue) == 0


async def test_running_then_stopped_then_deleted(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id, image="ghcr.io/acme/dev:1", env={"A": "1"})
    await world.seen(env_id)
    await world.reconciler.reconcile(env_id)

    container = await world.runtime.inspect(env_id)
    assert container is not None
    assert container.state is ContainerState.RUNNING
    assert container.spec.image == "ghcr.io/acme/dev:1"
    assert container.spec.env == {"A": "1"}
    environment = world.status(env_id)
    assert environment.status.phase is EnvironmentPhase.RUNNING
    assert environment.status.observed_generation == 1
    assert set(environment.status.timings) >= {"pull", "create", "start"}
    ready = next(c for c in environment.status.conditions if c.type == READY)
    assert ready.status is ConditionStatus.TRUE
    assert ready.observed_generation == 1

    world.server.set_desired(env_id, DesiredPhase.STOPPED)
    await world.seen(env_id)
    await world.reconciler.reconcile(env_id)
    assert await world.state(env_id) is ContainerState.STOPPED
    environment = world.status(env_id)
    assert environment.status.phase is EnvironmentPhase.STOPPED
    assert environment.status.observed_generation == 2
    ready = next(c for c in environment.status.conditions if c.type == READY)
    assert ready.status is ConditionStatus.FALSE

    world.server.set_desired(env_id, DesiredPhase.DELETED)
    await world.seen(env_id)
    await world.reconciler.reconcile(env_id)
    assert await world.runtime.inspect(env_id) is None
    assert env_id not in world.server.environments  # the server removed it once the runner said deleted


async def test_a_converged_environment_costs_no_writes(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id)
    await world.seen(env_id)
    await world.converge(env_id)
    writes = world.server.status_writes[env_id]
    version = world.status(env_id).metadata.resource_version
    await world.seen(env_id)
    await world.converge(env_id, rounds=5)
    assert world.server.status_writes[env_id] == writes
    assert world.status(env_id).metadata.resource_version == version


async def test_server_owned_status_survives_the_runners_reports(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id)
    await world.seen(env_id)
    await world.reconciler.reconcile(env_id)
    status = world.status(env_id).status
    assert status.runner_id == world.runner_id


async def test_temporary_failures_are_retried_until_running(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id)
    world.runtime.fail_next("create", times=2)
    world.runtime.fail_next("start")
    await world.seen(env_id)

    with pytest.raises(TemporaryError):
        await world.reconciler.reconcile(env_id)
    environment = world.status(env_id)
    assert environment.status.phase is EnvironmentPhase.CREATING
    assert "injected temporary failure of create" in environment.status.message

    await world.converge(env_id)
    environment = world.status(env_id)
    assert environment.status.phase is EnvironmentPhase.RUNNING
    assert environment.status.message == ""
    assert await world.state(env_id) is ContainerState.RUNNING


async def test_permanent_failure_is_reported_and_kept_until_the_spec_changes(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id)
    world.runtime.fail_next("create", permanent=True, message="no such image")
    await world.seen(env_id)

    with pytest.raises(PermanentError):
        await world.reconciler.reconcile(env_id)
    await world.converge(env_id)
    environment = world.status(env_id)
    assert environment.status.phase is EnvironmentPhase.FAILED
    assert environment.status.message == "no such image"
    assert environment.status.observed_generation == 1
    assert await world.runtime.inspect(env_id) is None  # not retried at this generation

    world.server.set_desired(env_id, DesiredPhase.STOPPED)
    await world.seen(env_id)
    await world.converge(env_id)
    assert world.status(env_id).status.phase is EnvironmentPhase.STOPPED
    assert world.status(env_id).status.observed_generation == 2

    world.server.set_desired(env_id, DesiredPhase.RUNNING)
    await world.seen(env_id)
    await world.converge(env_id)
    assert world.status(env_id).status.phase is EnvironmentPhase.RUNNING
    assert world.status(env_id).status.observed_generation == 3


async def test_deletion_is_retried_even_after_a_failure(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id)
    await world.seen(env_id)
    await world.reconciler.reconcile(env_id)
    world.runtime.fail_next("delete", permanent=True)
    world.server.set_desired(env_id, DesiredPhase.DELETED)
    await world.seen(env_id)
    with pytest.raises(PermanentError):
        await world.reconciler.reconcile(env_id)
    assert world.status(env_id).status.phase is EnvironmentPhase.FAILED
    await world.reconciler.reconcile(env_id)  # as the resync would
    assert env_id not in world.server.environments
    assert await world.runtime.inspect(env_id) is None


async def test_a_container_that_exited_is_started_again(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id)
    await world.seen(env_id)
    await world.reconciler.reconcile(env_id)
    world.runtime.simulate_exit(env_id)
    await world.reconciler.reconcile(env_id)
    assert await world.state(env_id) is ContainerState.RUNNING
    assert world.status(env_id).status.phase is EnvironmentPhase.RUNNING


async def test_an_environment_created_stopped_gets_no_container(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id, desired=DesiredPhase.STOPPED)
    await world.seen(env_id)
    await world.reconciler.reconcile(env_id)
    assert await world.runtime.inspect(env_id) is None
    assert world.status(env_id).status.phase is EnvironmentPhase.STOPPED


async def test_containers_unknown_to_a_synced_cache_are_removed(world: World) -> None:
    await world.runtime.create(ContainerSpec(environment_id="env_orphan", image="x"))
    await world.reconciler.reconcile("env_orphan")
    assert await world.runtime.inspect("env_orphan") is None


async def test_nothing_is_removed_while_the_server_is_unreachable(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id)
    await world.seen(env_id)
    await world.reconciler.reconcile(env_id)
    await world.runtime.create(ContainerSpec(environment_id="env_orphan", image="x"))

    world.server.go_down()
    await eventually(lambda: not world.informer.synced, what="the informer to notice")
    await world.reconciler.reconcile("env_orphan")
    await world.reconciler.reconcile(env_id)
    assert await world.runtime.inspect("env_orphan") is not None
    assert await world.state(env_id) is ContainerState.RUNNING

    world.server.come_back()
    await eventually(lambda: world.informer.synced, what="the informer to list again")
    await world.reconciler.reconcile("env_orphan")
    assert await world.runtime.inspect("env_orphan") is None


async def test_secrets_become_variables_and_registry_credentials_of_the_container(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id, image="127.0.0.1:5000/dev:1", env={"SHARED": "spec"})
    world.server.secrets[env_id] = [
        {"id": "sec_1", "name": "a", "type": "environment_variable", "target": "API_KEY", "value": "k"},
        {"id": "sec_2", "name": "b", "type": "environment_variable", "target": "SHARED", "value": "secret"},
        {"id": "sec_3", "name": "c", "type": "registry_credential", "target": "127.0.0.1:5000", "value": "u:p:q"},
        {"id": "sec_4", "name": "d", "type": "file", "target": "/home/dev/.npmrc", "value": "x"},
    ]
    await world.seen(env_id)
    await world.reconciler.reconcile(env_id)
    container = await world.runtime.inspect(env_id)
    assert container is not None
    assert container.spec.env == {"API_KEY": "k", "SHARED": "spec"}  # the spec's own variables win
    assert container.spec.registry_credentials == {"127.0.0.1:5000": ("u", "p:q")}
    assert "p:q" not in repr(container.spec)


async def test_an_environment_whose_secrets_are_refused_fails_with_the_reason(world: World) -> None:
    env_id = world.server.create_environment(world.runner_id)
    await world.seen(env_id)
    world.server.environments[env_id].status.runner_id = "run_someone_else"  # the server now refuses them
    with pytest.raises(PermanentError, match="secrets"):
        await world.reconciler.reconcile(env_id)
    assert await world.runtime.inspect(env_id) is None


async def test_a_slow_create_reports_its_phase_and_the_runtimes_progress(world: World) -> None:
    world.runtime.set_delay("create", 1.5)
    env_id = world.server.create_environment(world.runner_id)
    await world.seen(env_id)
    reconcile = asyncio.create_task(world.reconciler.reconcile(env_id))

    def creating_with_progress() -> bool:
        status = world.status(env_id).status
        return status.phase is EnvironmentPhase.CREATING and "creating the container" in status.message

    await eventually(creating_with_progress, what="the creating phase with the runtime's progress")
    await reconcile
    status = world.status(env_id).status
    assert status.phase is EnvironmentPhase.RUNNING
    assert status.message == ""


async def test_the_image_is_the_specs_else_the_organizations_default_else_the_runners(world: World) -> None:
    runners_default = world.server.create_environment(world.runner_id)
    await world.seen(runners_default)
    await world.reconciler.reconcile(runners_default)

    world.server.default_image = "registry.example/org/base:2"
    world.reconciler._organizations.clear()  # the organization is read again only after a while
    organizations_default = world.server.create_environment(world.runner_id)
    own = world.server.create_environment(world.runner_id, image="registry.example/mine:1")
    for env_id in (organizations_default, own):
        await world.seen(env_id)
        await world.reconciler.reconcile(env_id)

    images = {}
    for env_id in (runners_default, organizations_default, own):
        container = await world.runtime.inspect(env_id)
        assert container is not None
        images[env_id] = container.spec.image
    assert images == {
        runners_default: "debian:stable",
        organizations_default: "registry.example/org/base:2",
        own: "registry.example/mine:1",
    }
