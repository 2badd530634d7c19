"""Access tickets on the real server, on both databases: who gets one and when, what it says, that the runner can
check it with its gateway key (and only its own runner can), that two replicas sharing the secret key issue
tickets the same runner accepts, and that issuing one is audited."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devyard.client import ApiError, Client
from devyard.server.settings import ServerSettings
from devyard.wire.access import EnvironmentAccess, GatewayKey, TicketError, decode_key, verify_ticket
from support import live_server

SECRET_KEY = base64.urlsafe_b64encode(b"k" * 32).decode()
GATEWAY = "http://runner-host.test:7481"


@pytest.fixture
def server_settings(database_url: str, tmp_path: Path) -> ServerSettings:
    return live_server.settings_for(tmp_path / "server", database_url, secret_key=SECRET_KEY)


@dataclass
class World:
    admin: Client
    runner: Client
    runner_id: str
    org: str
    env_id: str
    url: str

    def user(self, name: str) -> Client:
        user = self.admin.post("/api/v1/users", {"metadata": {"name": name, "organization_id": self.org}})
        body = {"metadata": {"organization_id": self.org}, "spec": {"user_id": user["metadata"]["id"]}}
        return Client(self.url, self.admin.post("/api/v1/tokens", body)["secret"])

    def heartbeat(self, gateway: str | None) -> None:
        status: dict[str, Any] = {"capacity": 10, "runtime": "fake"}
        if gateway is not None:
            status["gateway"] = {"http_url": gateway}
        self.runner.put(f"/api/v1/runners/{self.runner_id}/status", {"status": status})

    def report(self, phase: str) -> None:
        self.runner.put(f"/api/v1/environments/{self.env_id}/status", {"status": {"phase": phase}})


@pytest.fixture
def world(server: live_server.LiveServer) -> Iterator[World]:
    with server.client() as admin:
        org = admin.get("/api/v1/organizations")["items"][0]["metadata"]["id"]
        created = admin.post("/api/v1/runners", {"metadata": {"name": "r"}})
        runner_id = created["runner"]["metadata"]["id"]
        with Client(server.url) as anonymous:
            token = anonymous.post("/api/v1/runners/exchange", {"exchange_token": created["exchange_token"]})["token"]
        with Client(server.url, token) as runner:
            world = World(admin, runner, runner_id, org, "", server.url)
            world.heartbeat(GATEWAY)
            admin.post("/api/v1/environment-classes", {"metadata": {"name": "c"}, "spec": {"runner_ids": [runner_id]}})
            env_id = admin.post("/api/v1/environments", {"spec": {"image": "debian"}})["metadata"]["id"]
            deadline = time.monotonic() + 20
            while admin.get(f"/api/v1/environments/{env_id}")["status"].get("runner_id") != runner_id:
                assert time.monotonic() < deadline, "the scheduler did not assign the environment"
                time.sleep(0.05)
            world.env_id = env_id
            world.report("running")
            yield world


def status_of(call: Any) -> int:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value.status


def test_a_ticket_for_a_running_environment_names_it_and_its_runner(world: World) -> None:
    before = time.time()
    access = EnvironmentAccess.model_validate(world.admin.post(f"/api/v1/environments/{world.env_id}/access"))
    assert (access.gateway_url, access.environment_id) == (GATEWAY, world.env_id)
    key = decode_key(GatewayKey.model_validate(world.runner.get(f"/api/v1/runners/{world.runner_id}/gateway-key")).key)
    claims = verify_ticket(access.ticket, key, now=time.time())
    admin_id = world.admin.get("/api/v1/whoami")["id"]
    assert (claims.environment_id, claims.runner_id, claims.user_id, claims.scope) == (
        world.env_id,
        world.runner_id,
        admin_id,
        "exec",
    )
    assert before < claims.exp <= time.time() + 60
    assert access.expires_at.timestamp() == claims.exp
    with pytest.raises(TicketError, match="expired"):
        verify_ticket(access.ticket, key, now=claims.exp)
    with pytest.raises(TicketError, match="signature"):
        verify_ticket(access.ticket, b"another key", now=time.time())
    again = world.admin.post(f"/api/v1/environments/{world.env_id}/access")
    assert again["ticket"] != access.ticket, "two tickets are never equal"

    events = world.admin.get(f"/api/v1/audit-events?target_id={world.env_id}&action=environment.access")["items"]
    assert len(events) == 2
    assert (events[0]["spec"]["actor_id"], events[0]["spec"]["details"]["runner_id"]) == (admin_id, world.runner_id)


def test_the_gateway_key_is_derived_from_the_shared_secret_key_and_the_runner(world: World) -> None:
    """Every replica holding the same secret key derives the same key: any of them may issue the tickets."""
    answer = world.runner.get(f"/api/v1/runners/{world.runner_id}/gateway-key")
    expected = hmac.new(SECRET_KEY.encode(), b"gateway-ticket:" + world.runner_id.encode(), hashlib.sha256).digest()
    assert decode_key(answer["key"]) == expected


def test_the_owner_gets_a_ticket_and_others_do_not(world: World) -> None:
    owner = world.user("owner")
    mine = owner.post("/api/v1/environments", {"spec": {"image": "debian"}})["metadata"]["id"]
    stranger = world.user("stranger")
    assert status_of(lambda: stranger.post(f"/api/v1/environments/{mine}/access")) == 404
    assert status_of(lambda: stranger.post(f"/api/v1/environments/{world.env_id}/access")) == 404
    assert status_of(lambda: world.runner.post(f"/api/v1/environments/{world.env_id}/access")) == 403
    # The owner's is not running yet: a conflict that says so.
    with pytest.raises(ApiError) as caught:
        owner.post(f"/api/v1/environments/{mine}/access")
    assert caught.value.status == 409 and "not running" in caught.value.message


def test_no_ticket_unless_running_on_a_runner_with_a_gateway(world: World) -> None:
    path = f"/api/v1/environments/{world.env_id}/access"
    world.report("stopping")
    with pytest.raises(ApiError) as caught:
        world.admin.post(path)
    assert caught.value.status == 409 and "is stopping, not running" in caught.value.message
    world.report("running")
    world.heartbeat(None)
    with pytest.raises(ApiError) as caught:
        world.admin.post(path)
    assert caught.value.status == 409 and "reports no gateway" in caught.value.message
    world.heartbeat(GATEWAY)
    assert world.admin.post(path)["gateway_url"] == GATEWAY


def test_only_the_runner_itself_fetches_its_gateway_key(world: World) -> None:
    path = f"/api/v1/runners/{world.runner_id}/gateway-key"
    assert status_of(lambda: world.admin.get(path)) == 403
    assert status_of(lambda: world.user("member").get(path)) == 404
    with Client(world.url) as anonymous:
        assert status_of(lambda: anonymous.get(path)) == 401
