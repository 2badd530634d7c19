"""Lifecycle hooks through the fake runtime, whose exec runs real processes: the spec's order, every command
form (string, argv, parallel object), once per container versus every start, a failure that stops what follows
and is remembered, and the plan kept on disk."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devyard.runner import lifecycle
from devyard.runner.fake_runtime import FakeRuntime
from devyard.runner.lifecycle import HookCommand, LifecyclePlan
from devyard.runner.runtime import ContainerSpec, ContainerStatus


@pytest.fixture
async def runtime(tmp_path: Path) -> FakeRuntime:
    runtime = FakeRuntime(state_file=tmp_path / "fake" / "state.json")
    await runtime.create(ContainerSpec(environment_id="env_l", image="busybox"))
    await runtime.start("env_l")
    return runtime


def marker_plan(markers: Path, **changes: object) -> LifecyclePlan:
    """Each command appends its name to ``markers``, so the file shows what ran, in which order."""

    def mark(name: str) -> str:
        return f"echo {name} >> {markers}"

    commands = (
        HookCommand("onCreateCommand", mark("onCreate"), "devcontainer.json"),
        HookCommand("updateContentCommand", ("/bin/sh", "-c", mark("updateContent")), "devcontainer.json"),
        HookCommand("postCreateCommand", mark("postCreate-feature"), "feature-a"),
        HookCommand(
            "postCreateCommand",
            {"one": mark("postCreate-parallel"), "two": ("/bin/sh", "-c", mark("postCreate-parallel"))},
            "devcontainer.json",
        ),
        HookCommand("postStartCommand", mark("postStart"), "devcontainer.json"),
        HookCommand("postAttachCommand", mark("postAttach"), "devcontainer.json"),
    )
    return dataclasses.replace(LifecyclePlan(commands=commands), **changes)  # type: ignore[arg-type]


async def container(runtime: FakeRuntime) -> ContainerStatus:
    status = await runtime.inspect("env_l")
    assert status is not None
    return status


async def test_hooks_run_in_order_once_per_container_and_start_hooks_every_start(
    runtime: FakeRuntime, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    plan = marker_plan(markers)
    state = tmp_path / "state"
    logs = tmp_path / "logs" / "lifecycle.log"
    first = await container(runtime)
    assert lifecycle.pending(state, plan, first).remaining == lifecycle.HOOKS
    assert not lifecycle.pending(state, plan, first).ready(plan.wait_for)

    seen: list[str] = []
    outcome = await lifecycle.run(runtime, state, plan, first, log_path=logs, on_hook=seen.append)
    assert outcome.done and outcome.ready(plan.wait_for)
    assert seen == list(lifecycle.HOOKS)
    assert markers.read_text().split() == [
        "onCreate",
        "updateContent",
        "postCreate-feature",
        "postCreate-parallel",
        "postCreate-parallel",
        "postStart",
        "postAttach",
    ]
    assert "[devyard] running postCreateCommand one (devcontainer.json)" in logs.read_text()
    # Nothing more for the same container and start.
    assert lifecycle.pending(state, plan, first).done

    # A new start runs the start hooks only.
    restarted = dataclasses.replace(first, started_at=(first.started_at or datetime.now(UTC)) + timedelta(seconds=5))
    assert lifecycle.pending(state, plan, restarted).remaining == lifecycle.START_HOOKS
    await lifecycle.run(runtime, state, plan, restarted, log_path=logs)
    assert markers.read_text().split()[-2:] == ["postStart", "postAttach"]

    # A new container (a rebuild) runs everything again.
    rebuilt = dataclasses.replace(first, created_at=first.created_at + timedelta(seconds=60))
    assert lifecycle.pending(state, plan, rebuilt).remaining == lifecycle.HOOKS


async def test_a_failing_hook_stops_the_rest_and_is_remembered(runtime: FakeRuntime, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    plan = marker_plan(markers)
    failing = HookCommand("updateContentCommand", "echo broken install >&2; exit 3", "devcontainer.json")
    plan = dataclasses.replace(plan, commands=(plan.commands[0], failing, *plan.commands[1:]))
    state = tmp_path / "state"
    current = await container(runtime)
    outcome = await lifecycle.run(runtime, state, plan, current, log_path=tmp_path / "lifecycle.log")
    assert outcome.failed_hook == "updateContentCommand"
    assert "exit code 3: broken install" in outcome.message
    assert not outcome.ready("updateContentCommand")
    assert outcome.ready("onCreateCommand")
    assert markers.read_text().split() == ["onCreate"]  # the rest never ran
    # A restart of the runner does not run it again: the failure stays until the container is made again.
    again = lifecycle.pending(state, plan, current)
    assert (again.failed_hook, again.remaining) == ("updateContentCommand", ())


async def test_the_plan_survives_on_disk(tmp_path: Path) -> None:
    plan = marker_plan(tmp_path / "markers", wait_for="postCreateCommand", user="dev", cwd="/w", env={"A": "1"})
    lifecycle.save_plan(tmp_path, plan)
    assert lifecycle.load_plan(tmp_path) == plan
    assert lifecycle.load_plan(tmp_path / "missing") is None
