"""The management plane's control loops: the scheduler places environments by class, organization, liveness
and capacity (and says why when it cannot), runner liveness marks silent runners offline and their
environments RunnerUnavailable until they return, and idle environments are stopped after their timeout."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devyard.client import Client
from devyard.server.settings import ServerSettings
from support import live_server
from support.world import eventually, make_user, register_runner


@pytest.fixture
def server_settings(database_url: str, tmp_path: Path) -> ServerSettings:
    return live_server.settings_for(
        tmp_path / "server", database_url, heartbeat_timeout=4.0, loop_interval=0.1, idle_check_interval=0.2
    )


def env_status(client: Client, env_id: str) -> dict[str, Any]:
    status: dict[str, Any] = client.get(f"/api/v1/environments/{env_id}")["status"]
    return status


def condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), None)


def waits_because(client: Client, env_id: str, reason: str) -> bool:
    found = condition(env_status(client, env_id), "Scheduled")
    return found is not None and found["status"] == "False" and found["reason"] == reason


def test_pending_without_runner_says_why_then_is_placed(admin_client: Client) -> None:
    env_id = admin_client.post("/api/v1/environments", {"spec": {"image": "i"}})["metadata"]["id"]
    eventually(lambda: waits_because(admin_client, env_id, "NoRunner"))
    runner = register_runner(admin_client, "late")
    eventually(lambda: waits_because(admin_client, env_id, "NoRunnerOnline"))
    runner.heartbeat()
    status = eventually(lambda: (s := env_status(admin_client, env_id)).get("runner_id") and s)
    assert status["runner_id"] == runner.id
    scheduled = condition(status, "Scheduled")
    assert scheduled is not None and scheduled["status"] == "True"
    assert status["timings"]["schedule"] > 0


def test_classes_decide_which_runners_may_take_an_environment(admin_client: Client) -> None:
    small, big = register_runner(admin_client, "small"), register_runner(admin_client, "big")
    small.heartbeat(capacity=10)
    big.heartbeat(capacity=10)
    gpu = admin_client.post(
        "/api/v1/environment-classes",
        {"metadata": {"name": "gpu"}, "spec": {"cpu": 8, "memory_mib": 32768, "runner_ids": [big.id]}},
    )
    ids = [
        admin_client.post("/api/v1/environments", {"spec": {"image": "i", "class_id": gpu["metadata"]["id"]}})[
            "metadata"
        ]["id"]
        for _ in range(4)
    ]
    for env_id in ids:
        assert eventually(lambda e=env_id: env_status(admin_client, e).get("runner_id")) == big.id
    offered = admin_client.get("/api/v1/environment-classes", {"runner_id": small.id})["items"]
    assert gpu["metadata"]["id"] not in {c["metadata"]["id"] for c in offered}

    admin_client.patch(f"/api/v1/environment-classes/{gpu['metadata']['id']}", {"spec": {"enabled": False}})
    from devyard.client import ApiError

    with pytest.raises(ApiError) as exc:
        admin_client.post("/api/v1/environments", {"spec": {"class_id": gpu["metadata"]["id"]}})
    assert exc.value.status == 400 and "disabled" in exc.value.message


def test_capacity_is_respected_and_load_spread(admin_client: Client) -> None:
    a, b = register_runner(admin_client, "a"), register_runner(admin_client, "b")
    a.heartbeat(capacity=2)
    b.heartbeat(capacity=2)
    ids = [admin_client.post("/api/v1/environments", {"spec": {"image": "i"}})["metadata"]["id"] for _ in range(5)]
    eventually(lambda: sum(1 for e in ids if env_status(admin_client, e).get("runner_id")) == 4)
    placed = [env_status(admin_client, e).get("runner_id") for e in ids]
    assert placed.count(a.id) == 2 and placed.count(b.id) == 2
    waiting = ids[placed.index(None)]
    eventually(lambda: waits_because(admin_client, waiting, "NoCapacity"))
    # An admin's cap below the runner's own capacity wins.
    admin_client.patch(f"/api/v1/runners/{a.id}", {"spec": {"max_environments": 1}})
    one_placed = ids[placed.index(a.id)]
    admin_client.delete(f"/api/v1/environments/{one_placed}")
    a.report(one_placed, phase="deleted", observed_generation=2)
    eventually(lambda: waits_because(admin_client, waiting, "NoCapacity"))
    a.heartbeat(capacity=5)
    admin_client.patch(f"/api/v1/runners/{a.id}", {"spec": {"max_environments": None}})
    assert eventually(lambda: env_status(admin_client, waiting).get("runner_id")) == a.id


def test_runners_serve_only_their_own_organization(admin_client: Client) -> None:
    carol = make_user(admin_client, "carol")
    other = carol.post("/api/v1/organizations", {"metadata": {"name": "other"}})["metadata"]["id"]
    register_runner(admin_client, "default-runner").heartbeat()
    theirs = carol.post("/api/v1/environments", {"metadata": {"organization_id": other}, "spec": {"image": "i"}})
    eventually(lambda: waits_because(carol, theirs["metadata"]["id"], "NoRunner"))
    assert env_status(carol, theirs["metadata"]["id"]).get("runner_id") is None


def test_a_silent_runner_goes_offline_and_comes_back(admin_client: Client) -> None:
    runner = register_runner(admin_client, "flaky")
    runner.heartbeat()
    env_id = admin_client.post("/api/v1/environments", {"spec": {"image": "i"}})["metadata"]["id"]
    eventually(lambda: env_status(admin_client, env_id).get("runner_id"))
    runner.report(env_id, phase="running", observed_generation=1)

    def offline() -> bool:
        r = admin_client.get(f"/api/v1/runners/{runner.id}")["status"]
        return r["phase"] == "offline"

    eventually(offline, timeout=10)
    unavailable = eventually(
        lambda: (c := condition(env_status(admin_client, env_id), "RunnerAvailable")) and c["status"] == "False" and c
    )
    assert unavailable["reason"] == "RunnerUnavailable"
    assert env_status(admin_client, env_id)["phase"] == "running", "the last reported phase stays"
    events = admin_client.get("/api/v1/audit-events", {"target_id": runner.id})["items"]
    assert "runner.offline" in {e["spec"]["action"] for e in events}

    runner.heartbeat()
    back = eventually(
        lambda: (c := condition(env_status(admin_client, env_id), "RunnerAvailable")) and c["status"] == "True" and c
    )
    assert back["reason"] == "RunnerOnline"


def test_an_environment_unused_past_its_timeout_is_stopped_and_one_in_use_is_not(admin_client: Client) -> None:
    runner = register_runner(admin_client, "idle")
    runner.heartbeat()

    def running(timeout: int | None) -> str:
        spec: dict[str, Any] = {"image": "i"} if timeout is None else {"image": "i", "timeout": timeout}
        runner.heartbeat()  # online: this module's runners go offline after 4 s of silence
        env_id: str = admin_client.post("/api/v1/environments", {"spec": spec})["metadata"]["id"]
        eventually(lambda: env_status(admin_client, env_id).get("runner_id"))
        runner.report(env_id, phase="running", observed_generation=1, last_activity_at=now())
        return env_id

    def desired(env_id: str) -> str:
        return str(admin_client.get(f"/api/v1/environments/{env_id}")["spec"]["desired_phase"])

    def now() -> str:
        return datetime.now(UTC).isoformat()

    idle, used, never = running(2), running(2), running(0)
    org_id = admin_client.get("/api/v1/whoami")["memberships"][0]["metadata"]["organization_id"]
    admin_client.patch(f"/api/v1/organizations/{org_id}", {"spec": {"policy": {"default_timeout": 2}}})
    by_default = running(None)
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:  # the gateways report use of this one all along
        runner.report(used, phase="running", observed_generation=1, last_activity_at=now())
        time.sleep(0.3)

    for env_id in (idle, by_default):
        assert eventually(lambda e=env_id: desired(e) == "stopped", timeout=10)
        stopped = admin_client.get(f"/api/v1/environments/{env_id}")
        assert stopped["metadata"]["generation"] == 2, "a stop is a spec change the runner acts on"
        why = condition(stopped["status"], "IdleTimeout")
        assert why is not None and why["status"] == "True" and "without activity" in why["message"]
        events = admin_client.get("/api/v1/audit-events", {"target_id": env_id})["items"]
        assert "environment.idle-timeout" in {e["spec"]["action"] for e in events}
    assert desired(used) == "running"
    assert desired(never) == "running"

    admin_client.patch(f"/api/v1/environments/{idle}", {"spec": {"desired_phase": "running"}})
    again = condition(env_status(admin_client, idle), "IdleTimeout")
    assert again is not None and again["status"] == "False", "started again, the idle stop is history"
