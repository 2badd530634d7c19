"""Kill the runner: a whole ``devyard runner --runtime linux`` process, SIGKILLed with the runc and mount
processes it was running, in the middle of a start, a stop or a delete, then started again. The environment must
reach its desired phase (running with exec working; stopped with its disk kept; deleted with nothing left on
the host), and ``doctor`` must find no orphans and no drift. And a running environment outlives a killed runner:
the restarted runner adopts its container (same PID 1, same start time) rather than restarting it.

Real runc, a real registry with busybox, the real server in this process. Kill points: random delays after the
desired phase is set (the steps take tens of milliseconds on busybox, so most land around them), and the moment
the status shows the step's phase. The seed is printed, so a failure can be replayed (``DEVYARD_TEST_SEED``).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from devyard.client import Client
from devyard.runner import doctor
from support import live_server

from .runner_host import (  # noqa: F401 - fixtures
    RunnerHost,
    RunnerProcess,
    environment_phase,
    pid1_start,
    runner_host_fixture,
    sqlite_server_fixture,
    wait_for,
)

ATTEMPTS = 5
#: Kill points: seconds after the desired phase is set, or (None) the moment the status shows the step.
MAX_DELAY = 0.3
CONVERGE_SECONDS = 45.0


@pytest.fixture
def chance() -> random.Random:
    seed = int(os.environ.get("DEVYARD_TEST_SEED") or random.randrange(1 << 30))
    print(f"seed {seed}")
    return random.Random(seed)


@pytest.fixture
def admin(server: live_server.LiveServer) -> Iterator[Client]:
    with server.client() as client:
        yield client


def online(where: RunnerHost, admin: Client) -> RunnerProcess:
    """Start the runner and wait until the server sees a heartbeat from this process."""
    before = {r["metadata"]["id"]: r["status"].get("last_heartbeat_at") for r in admin.get("/api/v1/runners")["items"]}
    runner = where.start()

    def fresh() -> bool:
        if runner.process.poll() is not None:
            raise AssertionError(f"the runner exited with {runner.process.returncode}:\n{where.log.read_text()}")
        return any(
            r["status"]["phase"] == "online" and r["status"].get("last_heartbeat_at") != before.get(r["metadata"]["id"])
            for r in admin.get("/api/v1/runners")["items"]
        )

    wait_for(fresh, bool, what="a heartbeat of the runner")
    return runner


def kill_at(
    runner: RunnerProcess,
    chance: random.Random,
    admin: Client,
    environment_id: str,
    phases: set[str],
    max_delay: float = MAX_DELAY,
) -> str:
    """Kill the runner at a random point: after a random delay, or once the environment's status shows one of
    ``phases``. Returns where, for the test's output."""

    def status() -> str | None:
        return environment_phase(admin, environment_id)

    if chance.random() < 0.3:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and status() not in phases:
            time.sleep(0.005)
        runner.kill()
        return f"at phase {status()}"
    delay = chance.uniform(0, max_delay)
    time.sleep(delay)
    runner.kill()
    return f"after {delay:.3f}s"


def left_by_the_kill(where: RunnerHost) -> str:
    """What doctor sees on the host between the kill and the restart (for the test's output)."""
    report = asyncio.run(doctor.examine(where.settings()))
    kinds = Counter(f"{f.status.value} {f.what}" for f in report.findings if f.difference)
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items()))


def converged(where: RunnerHost, admin: Client, environment_id: str, phase: str | None) -> None:
    def current() -> str | None:
        return environment_phase(admin, environment_id)

    try:
        wait_for(current, lambda value: value == phase, timeout=CONVERGE_SECONDS, what=f"{environment_id} {phase}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nrunner log:\n{where.log.read_text()[-6000:]}") from None


def assert_doctor_clean(where: RunnerHost) -> None:
    report = asyncio.run(doctor.examine(where.settings()))
    assert report.server_reachable, report.server_message
    differences = [finding for finding in report.findings if finding.difference]
    assert differences == [], where.log.read_text()[-4000:]


def assert_running(where: RunnerHost, environment_id: str) -> None:
    answer = where.exec(environment_id, "echo alive")
    assert (answer.returncode, answer.stdout) == (0, "alive\n"), answer.stderr


def create(admin: Client, image: str) -> str:
    return str(admin.post("/api/v1/environments", {"spec": {"image": image}})["metadata"]["id"])


@pytest.mark.slow
def test_a_start_killed_half_way_is_finished_by_the_next_runner(
    runner_host: RunnerHost, admin: Client, busybox_image: str, chance: random.Random
) -> None:
    where = runner_host
    runner = online(where, admin)
    for attempt in range(ATTEMPTS):
        environment_id = create(admin, busybox_image)
        point = kill_at(runner, chance, admin, environment_id, {"creating", "starting"}, 0.15)
        print(f"start {attempt}: killed {point}: {left_by_the_kill(where) or 'nothing to repair'}")
        runner = online(where, admin)
        converged(where, admin, environment_id, "running")
        assert_running(where, environment_id)
        assert_doctor_clean(where)
    runner.stop()


@pytest.mark.slow
def test_a_stop_killed_half_way_is_finished_and_keeps_the_disk(
    runner_host: RunnerHost, admin: Client, busybox_image: str, chance: random.Random
) -> None:
    where = runner_host
    runner = online(where, admin)
    environment_id = create(admin, busybox_image)
    converged(where, admin, environment_id, "running")
    assert where.exec(environment_id, "echo kept > /root/marker").returncode == 0
    for attempt in range(ATTEMPTS):
        admin.patch(f"/api/v1/environments/{environment_id}", {"spec": {"desired_phase": "stopped"}})
        point = kill_at(runner, chance, admin, environment_id, {"stopping"})
        print(f"stop {attempt}: killed {point}: {left_by_the_kill(where) or 'nothing to repair'}")
        runner = online(where, admin)
        converged(where, admin, environment_id, "stopped")
        assert where.runc_state(environment_id) is None
        assert (where.state_dir / "environments" / environment_id / "upper" / "root" / "marker").read_text() == "kept\n"
        assert where.namespaces() == [] and where.veths() == [] and where.cgroups() == []
        assert_doctor_clean(where)
        admin.patch(f"/api/v1/environments/{environment_id}", {"spec": {"desired_phase": "running"}})
        converged(where, admin, environment_id, "running")
        answer = where.exec(environment_id, "cat /root/marker")
        assert answer.stdout == "kept\n", answer.stderr
    runner.stop()


@pytest.mark.slow
def test_a_delete_killed_half_way_is_finished_and_leaves_nothing(
    runner_host: RunnerHost, admin: Client, busybox_image: str, chance: random.Random
) -> None:
    where = runner_host
    runner = online(where, admin)
    for attempt in range(ATTEMPTS):
        environment_id = create(admin, busybox_image)
        converged(where, admin, environment_id, "running")
        admin.delete(f"/api/v1/environments/{environment_id}")
        point = kill_at(runner, chance, admin, environment_id, {"deleting"})
        print(f"delete {attempt}: killed {point}: {left_by_the_kill(where) or 'nothing to repair'}")
        runner = online(where, admin)
        converged(where, admin, environment_id, None)
        wait_for(where.leftovers, lambda found: found == {}, timeout=10, what="nothing left on the host")
        assert not (where.state_dir / "environments" / environment_id).exists()
        assert_doctor_clean(where)
    runner.stop()


def test_a_running_environment_outlives_a_killed_runner_and_is_adopted(
    runner_host: RunnerHost, admin: Client, busybox_image: str
) -> None:
    where = runner_host
    runner = online(where, admin)
    environment_id = create(admin, busybox_image)
    converged(where, admin, environment_id, "running")
    state = where.runc_state(environment_id)
    assert state is not None and state["status"] == "running"
    pid, started = state["pid"], pid1_start(state["pid"])

    runner.kill()
    after_kill = where.runc_state(environment_id)
    assert after_kill is not None and (after_kill["status"], after_kill["pid"]) == ("running", pid)
    assert_running(where, environment_id)

    online(where, admin)
    # A spec change makes the new runner reconcile the environment, so what follows is after it has looked.
    changed = admin.patch(f"/api/v1/environments/{environment_id}", {"spec": {"env": {"ADOPTED": "1"}}})
    generation = changed["metadata"]["generation"]
    wait_for(
        lambda: admin.get(f"/api/v1/environments/{environment_id}")["status"],
        lambda status: status["observed_generation"] == generation and status["phase"] == "running",
        what="the new runner's reconcile",
    )
    adopted = where.runc_state(environment_id)
    assert adopted is not None and adopted["pid"] == pid and pid1_start(pid) == started
    assert_running(where, environment_id)
    assert_doctor_clean(where)
