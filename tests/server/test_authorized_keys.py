"""``GET /api/v1/environments/{id}/authorized-keys`` on the real server, on both databases: the runner an
environment is assigned to reads its owner's keys (and sees a removed one disappear), nobody else does."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devyard.client import ApiError, Client
from devyard.wire.ssh_keys import AuthorizedKeys
from support import live_server


def public_key(directory: Path, name: str) -> str:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class World:
    url: str
    admin: Client
    org: str
    runners: dict[str, tuple[str, Client]]

    def user(self, name: str) -> Client:
        user = self.admin.post("/api/v1/users", {"metadata": {"name": name, "organization_id": self.org}})
        body = {"metadata": {"organization_id": self.org}, "spec": {"user_id": user["metadata"]["id"]}}
        return Client(self.url, self.admin.post("/api/v1/tokens", body)["secret"])

    def environment(self, owner: Client, runner: str) -> str:
        """An environment of ``owner``'s, once the scheduler assigned it to ``runner``."""
        runner_id, _ = self.runners[runner]
        env_id = owner.post("/api/v1/environments", {"spec": {"class_id": self.classes[runner]}})["metadata"]["id"]
        deadline = time.monotonic() + 20
        while owner.get(f"/api/v1/environments/{env_id}")["status"].get("runner_id") != runner_id:
            assert time.monotonic() < deadline, "the scheduler did not assign the environment"
            time.sleep(0.05)
        return env_id

    classes: dict[str, str]


@pytest.fixture
def world(server: live_server.LiveServer) -> Iterator[World]:
    with server.client() as admin:
        org = admin.get("/api/v1/organizations")["items"][0]["metadata"]["id"]
        world = World(server.url, admin, org, {}, {})
        for name in ("r1", "r2"):
            created = admin.post("/api/v1/runners", {"metadata": {"name": name}})
            runner_id = created["runner"]["metadata"]["id"]
            with Client(server.url) as anonymous:
                exchange = {"exchange_token": created["exchange_token"]}
                token = anonymous.post("/api/v1/runners/exchange", exchange)["token"]
            runner = Client(server.url, token)
            runner.put(f"/api/v1/runners/{runner_id}/status", {"status": {"capacity": 10, "runtime": "fake"}})
            body: dict[str, Any] = {"metadata": {"name": f"class-{name}"}, "spec": {"runner_ids": [runner_id]}}
            world.classes[name] = admin.post("/api/v1/environment-classes", body)["metadata"]["id"]
            world.runners[name] = (runner_id, runner)
        try:
            yield world
        finally:
            for _, runner in world.runners.values():
                runner.close()


def status_of(call: Any) -> int:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value.status


def test_the_assigned_runner_reads_the_owners_keys_and_a_removed_key_is_gone(world: World, tmp_path: Path) -> None:
    alice, bob = world.user("alice"), world.user("bob")
    alice_id = alice.get("/api/v1/whoami")["id"]
    first = alice.post("/api/v1/ssh-keys", {"spec": {"public_key": public_key(tmp_path, "a1")}})
    second = alice.post("/api/v1/ssh-keys", {"spec": {"public_key": public_key(tmp_path, "a2")}})
    bob.post("/api/v1/ssh-keys", {"spec": {"public_key": public_key(tmp_path, "b1")}})
    env_id = world.environment(alice, "r1")
    _, runner = world.runners["r1"]

    answer = AuthorizedKeys.model_validate(runner.get(f"/api/v1/environments/{env_id}/authorized-keys"))
    assert answer.environment_id == env_id
    assert sorted((k.user_id, k.fingerprint, k.public_key) for k in answer.keys) == sorted(
        (alice_id, key["status"]["fingerprint"], key["spec"]["public_key"]) for key in (first, second)
    )

    alice.delete(f"/api/v1/ssh-keys/{first['metadata']['id']}")
    answer = AuthorizedKeys.model_validate(runner.get(f"/api/v1/environments/{env_id}/authorized-keys"))
    assert [k.fingerprint for k in answer.keys] == [second["status"]["fingerprint"]]


def test_an_environment_without_keys_has_none(world: World) -> None:
    carol = world.user("carol")
    env_id = world.environment(carol, "r1")
    _, runner = world.runners["r1"]
    assert runner.get(f"/api/v1/environments/{env_id}/authorized-keys")["keys"] == []


def test_only_the_assigned_runner_may_read_them(world: World, tmp_path: Path) -> None:
    alice, bob = world.user("alice"), world.user("bob")
    alice.post("/api/v1/ssh-keys", {"spec": {"public_key": public_key(tmp_path, "a1")}})
    env_id = world.environment(alice, "r1")
    path = f"/api/v1/environments/{env_id}/authorized-keys"
    _, other_runner = world.runners["r2"]
    # Another runner of the organization does not see the environment at all.
    assert status_of(lambda: other_runner.get(path)) == 404
    # Users, the owner and an admin included, are not runners.
    assert status_of(lambda: alice.get(path)) == 403
    assert status_of(lambda: world.admin.get(path)) == 403
    assert status_of(lambda: bob.get(path)) in (403, 404)
    _, runner = world.runners["r1"]
    assert status_of(lambda: runner.get("/api/v1/environments/env_missing/authorized-keys")) == 404
