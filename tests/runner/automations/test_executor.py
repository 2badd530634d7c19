"""The automations executor through the fake runtime, whose exec runs real processes: services that get ready,
never do, exit, stop with and without a stop command (and get killed when they ignore SIGTERM); tasks in
dependency order with a failure and what depends on it skipped; a restarted runner's leftovers; logs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from devyard.runner.automations import (
    AutomationsExecutor,
    ExecutorSettings,
    follow_log,
    log_path,
    parse_automations,
    read_log,
)
from devyard.runner.fake_runtime import FakeRuntime
from devyard.runner.runtime import ContainerSpec
from devyard.wire.automations import AutomationPhase, AutomationStatus, AutomationTrigger

from ..conftest import eventually

ENV = "env_auto"
FAST = ExecutorSettings(ready_timeout=5.0, ready_interval=0.05, stop_grace=2.0)
Phase = AutomationPhase


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[FakeRuntime]:
    runtime = FakeRuntime(state_file=tmp_path / "fake" / "state.json")
    await runtime.create(ContainerSpec(environment_id=ENV, image="busybox"))
    await runtime.start(ENV)
    yield runtime
    await runtime.close()


class Recorder:
    """Every status change the executor published, in order."""

    def __init__(self) -> None:
        self.changes: list[AutomationStatus] = []

    def __call__(self, status: AutomationStatus) -> None:
        self.changes.append(status)

    def phases(self, automation_id: str) -> list[Phase]:
        seen: list[Phase] = []
        for status in self.changes:
            if status.id == automation_id and (not seen or seen[-1] is not status.phase):
                seen.append(status.phase)
        return seen


#: Every executor a test made, stopped after it so that no process outlives a failed test.
_made: list[AutomationsExecutor] = []


@pytest.fixture(autouse=True)
async def stop_everything() -> AsyncIterator[None]:
    yield
    while _made:
        await _made.pop().stop_all()


def make_executor(
    runtime: FakeRuntime, tmp_path: Path, text: str, *, settings: ExecutorSettings = FAST
) -> tuple[AutomationsExecutor, Recorder]:
    recorder = Recorder()
    executor = AutomationsExecutor(
        runtime,
        ENV,
        parse_automations(text, path="automations.yaml"),
        log_root=tmp_path / "logs",
        state_dir=tmp_path / "state" / ENV / "automations",
        on_change=recorder,
        settings=settings,
    )
    _made.append(executor)
    return executor, recorder


def phase_is(executor: AutomationsExecutor, automation_id: str, phase: Phase) -> Callable[[], bool]:
    return lambda: executor.status(automation_id).phase is phase


def output_lines(chunks: list[bytes]) -> list[bytes]:
    """The lines of a log that the automation printed, without devyard's own."""
    return [line for line in b"".join(chunks).splitlines() if not line.startswith(b"[devyard] ")]


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting for its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_service_becomes_ready_and_stops_with_its_children(runtime: FakeRuntime, tmp_path: Path) -> None:
    up, child = tmp_path / "up", tmp_path / "child.pid"
    executor, recorder = make_executor(
        runtime,
        tmp_path,
        f"""
services:
  web:
    name: Web
    triggeredBy: [postEnvironmentStart]
    commands:
      start: "sleep 60 & echo $! > {child}; sleep 0.2; touch {up}; echo serving; wait"
      ready: test -f {up}
""",
    )
    await executor.on_trigger(AutomationTrigger.POST_ENVIRONMENT_START)
    await eventually(phase_is(executor, "web", Phase.READY), what="web ready")
    status = executor.status("web")
    assert status.name == "Web" and status.triggered_by is AutomationTrigger.POST_ENVIRONMENT_START
    assert status.started_at is not None and status.finished_at is None
    sleeper = int(child.read_text())
    assert alive(sleeper)

    await executor.stop("web")
    status = executor.status("web")
    assert status.phase is Phase.STOPPED and status.finished_at is not None
    assert recorder.phases("web") == [Phase.STARTING, Phase.READY, Phase.STOPPING, Phase.STOPPED]
    # The shell's child got the signal too: nothing of the service is left.
    await eventually(lambda: not alive(sleeper), what="the service's child to be gone")
    assert "serving" in (tmp_path / "logs" / ENV / "automations" / "web.log").read_text()


async def test_a_service_without_a_ready_command_is_ready_once_started(runtime: FakeRuntime, tmp_path: Path) -> None:
    executor, recorder = make_executor(runtime, tmp_path, "services:\n  db:\n    commands: {start: sleep 60}\n")
    # No trigger starts it: only a manual start.
    await executor.on_trigger(AutomationTrigger.POST_ENVIRONMENT_START)
    assert executor.status("db").phase is Phase.PENDING
    await executor.start("db")
    await eventually(phase_is(executor, "db", Phase.READY), what="db ready")
    assert executor.status("db").triggered_by is AutomationTrigger.MANUAL
    await executor.start("db")  # already running: nothing happens
    await executor.stop_all()
    assert recorder.phases("db") == [Phase.STARTING, Phase.READY, Phase.STOPPING, Phase.STOPPED]


async def test_a_service_that_never_gets_ready_fails_and_is_stopped(runtime: FakeRuntime, tmp_path: Path) -> None:
    child = tmp_path / "child.pid"
    settings = ExecutorSettings(ready_timeout=0.5, ready_interval=0.05, stop_grace=2.0)
    executor, recorder = make_executor(
        runtime,
        tmp_path,
        f"""
services:
  slow:
    triggeredBy: [postDevcontainerStart]
    commands:
      start: "sleep 60 & echo $! > {child}; wait"
      ready: "echo still warming up; exit 1"
""",
        settings=settings,
    )
    await executor.on_trigger(AutomationTrigger.POST_DEVCONTAINER_START)
    await eventually(phase_is(executor, "slow", Phase.FAILED), what="slow to fail")
    status = executor.status("slow")
    assert status.message == "not ready within 0.5 s (the ready command said: still warming up)"
    # SIGTERM was enough: it was not killed after the grace period.
    assert status.exit_code == 128 + 15
    assert "killing it" not in log_path(tmp_path / "logs", ENV, "slow").read_text()
    assert recorder.phases("slow") == [Phase.STARTING, Phase.FAILED]
    await eventually(lambda: not alive(int(child.read_text())), what="the service to be gone")


async def test_a_service_that_exits_fails_with_its_exit_code(runtime: FakeRuntime, tmp_path: Path) -> None:
    executor, recorder = make_executor(
        runtime,
        tmp_path,
        """
services:
  crashing:
    commands:
      start: "echo cannot bind the port >&2; exit 3"
      ready: "false"
  flaky:
    commands:
      start: "sleep 0.3; echo lost the connection; exit 4"
""",
    )
    await executor.start("crashing")
    await executor.start("flaky")
    await eventually(phase_is(executor, "crashing", Phase.FAILED), what="crashing to fail")
    crashing = executor.status("crashing")
    assert crashing.exit_code == 3
    assert crashing.message == "exited with 3 before it was ready: cannot bind the port"
    await eventually(phase_is(executor, "flaky", Phase.FAILED), what="flaky to fail")
    flaky = executor.status("flaky")
    assert flaky.exit_code == 4 and flaky.message == "exited with 4: lost the connection"
    assert recorder.phases("flaky") == [Phase.STARTING, Phase.READY, Phase.FAILED]
    # A failed service starts again when asked.
    await executor.start("flaky")
    await eventually(phase_is(executor, "flaky", Phase.READY), what="flaky to start again")
    await executor.stop("flaky")


async def test_stop_runs_the_stop_command(runtime: FakeRuntime, tmp_path: Path) -> None:
    stop_file = tmp_path / "stop"
    executor, _ = make_executor(
        runtime,
        tmp_path,
        f"""
services:
  queue:
    commands:
      start: "trap 'echo got SIGTERM' TERM; while [ ! -f {stop_file} ]; do sleep 0.05; done; echo drained"
      stop: "echo asked to stop; touch {stop_file}"
""",
    )
    await executor.start("queue")
    await eventually(phase_is(executor, "queue", Phase.READY), what="queue ready")
    await executor.stop("queue")
    status = executor.status("queue")
    assert status.phase is Phase.STOPPED and status.exit_code == 0
    lines = log_path(tmp_path / "logs", ENV, "queue").read_text().splitlines()
    assert "asked to stop" in lines and "drained" in lines and "got SIGTERM" not in lines


async def test_stop_without_a_stop_command_terminates_then_kills(runtime: FakeRuntime, tmp_path: Path) -> None:
    settings = ExecutorSettings(ready_timeout=5.0, ready_interval=0.05, stop_grace=0.5)
    executor, _ = make_executor(
        runtime,
        tmp_path,
        """
services:
  polite:
    commands:
      start: "trap 'echo terminating; exit 0' TERM; while :; do sleep 0.05; done"
  stubborn:
    commands:
      start: "trap '' TERM; while :; do sleep 0.05; done"
""",
        settings=settings,
    )
    await executor.start("polite")
    await executor.start("stubborn")
    await eventually(phase_is(executor, "polite", Phase.READY), what="polite ready")
    await eventually(phase_is(executor, "stubborn", Phase.READY), what="stubborn ready")
    await executor.stop_all()
    polite, stubborn = executor.status("polite"), executor.status("stubborn")
    assert polite.phase is Phase.STOPPED and polite.exit_code == 0
    assert "terminating" in log_path(tmp_path / "logs", ENV, "polite").read_text().splitlines()
    assert stubborn.phase is Phase.STOPPED and stubborn.exit_code == 137
    assert "after SIGTERM: killing it" in log_path(tmp_path / "logs", ENV, "stubborn").read_text()


async def test_tasks_run_in_dependency_order_and_a_failure_skips_its_dependants(
    runtime: FakeRuntime, tmp_path: Path
) -> None:
    order = tmp_path / "order"
    executor, recorder = make_executor(
        runtime,
        tmp_path,
        f"""
tasks:
  test:
    command: echo test >> {order}
    dependsOn: [build]
    triggeredBy: [postEnvironmentStart]
  build:
    command: "echo build >> {order}; echo compile error; exit 2"
    dependsOn: [deps]
  deps:
    command: "sleep 0.2; echo deps >> {order}"
  lint:
    command: echo lint >> {order}
    dependsOn: [deps]
    triggeredBy: [postEnvironmentStart]
  report:
    command: echo report >> {order}
    dependsOn: [test]
    triggeredBy: [postEnvironmentStart]
  other:
    command: echo other >> {order}
    triggeredBy: [manual]
""",
    )
    await executor.on_trigger(AutomationTrigger.POST_ENVIRONMENT_START)
    await executor.wait_idle()
    phases = {status.id: status.phase for status in executor.statuses()}
    assert phases == {
        "deps": Phase.SUCCEEDED,
        "build": Phase.FAILED,
        "lint": Phase.SUCCEEDED,
        "test": Phase.SKIPPED,
        "report": Phase.SKIPPED,
        "other": Phase.PENDING,
    }
    ran = order.read_text().split()
    assert ran[0] == "deps" and sorted(ran[1:]) == ["build", "lint"]
    build = executor.status("build")
    assert build.exit_code == 2 and build.message == "exited with 2: compile error"
    assert executor.status("test").message == "not run: 'build', which it depends on, failed"
    assert executor.status("report").message == "not run: 'test', which it depends on, was skipped"
    assert executor.status("deps").triggered_by is AutomationTrigger.POST_ENVIRONMENT_START
    assert recorder.phases("deps") == [Phase.PENDING, Phase.RUNNING, Phase.SUCCEEDED]
    assert recorder.phases("test") == [Phase.PENDING, Phase.SKIPPED]

    # A manual run of one task runs what it depends on again, and nothing else.
    order.unlink()
    await executor.start("lint")
    await executor.wait_idle()
    assert order.read_text().split() == ["deps", "lint"]
    assert executor.status("lint").triggered_by is AutomationTrigger.MANUAL
    assert executor.status("other").phase is Phase.PENDING


async def test_a_running_task_can_be_stopped(runtime: FakeRuntime, tmp_path: Path) -> None:
    started = tmp_path / "started"
    executor, _ = make_executor(
        runtime,
        tmp_path,
        f"""
tasks:
  long: {{command: "touch {started}; sleep 60"}}
  after: {{command: "true", dependsOn: [long]}}
""",
    )
    await executor.start("after")
    await eventually(started.exists, what="long to start")
    await executor.stop("long")
    await executor.wait_idle()
    long = executor.status("long")
    assert long.phase is Phase.FAILED and long.message == "stopped"
    assert executor.status("after").phase is Phase.SKIPPED


async def test_a_stopped_container_fails_what_starts_and_a_bad_callback_breaks_nothing(
    runtime: FakeRuntime, tmp_path: Path
) -> None:
    calls: list[str] = []

    def failing_callback(status: AutomationStatus) -> None:
        calls.append(status.id)
        raise RuntimeError("the reconciler is broken")

    executor = AutomationsExecutor(
        runtime,
        ENV,
        parse_automations("tasks:\n  t: {command: 'true'}\n", path="a.yaml"),
        log_root=tmp_path / "logs",
        state_dir=tmp_path / "state",
        on_change=failing_callback,
        settings=FAST,
    )
    await executor.start("t")
    await executor.wait_idle()
    assert executor.status("t").phase is Phase.SUCCEEDED and calls
    await runtime.stop(ENV)
    await executor.start("t")
    await executor.wait_idle()
    status = executor.status("t")
    assert status.phase is Phase.FAILED and status.message.startswith("could not start: ")
    with pytest.raises(KeyError, match="no automation 'nope'"):
        await executor.start("nope")


async def test_a_restarted_runner_stops_what_it_cannot_watch_and_starts_services_again(
    runtime: FakeRuntime, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    text = f"""
services:
  web:
    triggeredBy: [postEnvironmentStart]
    commands:
      start: "echo $$ >> {pids}; sleep 60 & wait"
tasks:
  migrate:
    command: "echo $$ > {tmp_path / "task.pid"}; sleep 60"
"""
    before, _ = make_executor(runtime, tmp_path, text)
    await before.on_trigger(AutomationTrigger.POST_ENVIRONMENT_START)
    await before.start("migrate")
    await eventually(phase_is(before, "web", Phase.READY), what="web to run")
    # The executor keeps a record of each process it runs once it knows its id.
    record = tmp_path / "state" / ENV / "automations" / "migrate.json"
    await eventually(lambda: record.exists() and (tmp_path / "task.pid").exists(), what="migrate to run")
    old_service, old_task = int(pids.read_text()), int((tmp_path / "task.pid").read_text())

    # A new runner process: a new executor on the same state directory.
    after, _ = make_executor(runtime, tmp_path, text)
    await after.recover()
    assert not alive(old_service) and not alive(old_task)
    await eventually(phase_is(after, "web", Phase.READY), what="web to run again")
    assert after.status("web").triggered_by is AutomationTrigger.POST_ENVIRONMENT_START
    await eventually(lambda: len(pids.read_text().split()) == 2, what="a new web process")
    migrate = after.status("migrate")
    assert migrate.phase is Phase.FAILED and migrate.message == "interrupted: the runner restarted while it ran"
    await after.stop_all()
    await before.wait_idle()
    # Nothing left to recover once everything stopped.
    again, again_recorder = make_executor(runtime, tmp_path, text)
    await again.recover()
    assert again_recorder.changes == []


async def test_logs_get_a_header_per_run_are_followed_and_keep_their_tail(runtime: FakeRuntime, tmp_path: Path) -> None:
    settings = ExecutorSettings(ready_timeout=5.0, ready_interval=0.05, stop_grace=2.0, log_limit=4000)
    go = tmp_path / "go"
    executor, _ = make_executor(
        runtime,
        tmp_path,
        f"""
tasks:
  chatty:
    command: "echo first; while [ ! -f {go} ]; do sleep 0.05; done; echo second"
  noisy:
    command: "i=0; while [ $i -lt 500 ]; do echo line $i of the noisy task; i=$((i+1)); done"
""",
        settings=settings,
    )
    path = log_path(tmp_path / "logs", ENV, "chatty")
    assert (await read_log(path)).data == b""
    await executor.start("chatty")
    received: list[bytes] = []

    async def follow() -> None:
        async for chunk in follow_log(
            path, finished=lambda: executor.status("chatty").phase is Phase.SUCCEEDED, poll_interval=0.02
        ):
            received.append(chunk)

    follower = asyncio.create_task(follow())
    await eventually(lambda: b"first" in output_lines(received), what="the follower to see the first line")
    assert b"second" not in output_lines(received)
    go.touch()
    await asyncio.wait_for(follower, 10)
    followed = b"".join(received)
    assert output_lines(received) == [b"first", b"second"]
    assert followed == path.read_bytes()

    # Read from an offset: what came after it.
    middle = followed.index(b"\nsecond\n") + 1
    chunk = await read_log(path, middle)
    assert chunk.data == followed[middle:] and chunk.next_offset == len(followed)

    # A second run is appended under a header of its own.
    go.unlink()
    await executor.start("chatty")
    await eventually(lambda: output_lines([path.read_bytes()]) == [b"first", b"second", b"first"], what="a rerun")
    go.touch()
    await executor.wait_idle()
    assert path.read_text().count("[devyard] ") >= 4 and path.read_text().count("running chatty (manual)") == 2

    # A log past its limit keeps its newest lines.
    await executor.start("noisy")
    await executor.wait_idle()
    noisy = log_path(tmp_path / "logs", ENV, "noisy").read_text()
    assert len(noisy) <= 4000
    assert "line 499 of the noisy task" in noisy and "line 0 of the noisy task" not in noisy
    assert noisy.startswith("[devyard] (older output dropped")


async def test_the_processes_are_inside_the_environment_as_its_exec_runs_them(
    runtime: FakeRuntime, tmp_path: Path
) -> None:
    """The fake runtime runs them in the container's scratch directory with the container's remote env."""
    spec = ContainerSpec(environment_id="env_other", image="busybox", remote_env={"GREETING": "hello"})
    await runtime.create(spec)
    await runtime.start("env_other")
    executor = AutomationsExecutor(
        runtime,
        "env_other",
        parse_automations("tasks:\n  where: {command: 'echo $GREETING from $(pwd)'}\n", path="a.yaml"),
        log_root=tmp_path / "logs",
        state_dir=tmp_path / "state",
        settings=FAST,
    )
    await executor.start("where")
    await executor.wait_idle()
    text = log_path(tmp_path / "logs", "env_other", "where").read_text()
    assert "hello from " in text and os.path.basename(text.split("hello from ")[1].split()[0]) == "env_other"
