"""Small steps that many server tests take: register a runner, make it online, make users with tokens.

Each goes through the public API with ``devyard.client.Client``, as a real runner or admin would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devyard.client import Client

__all__ = ["RegisteredRunner", "eventually", "make_user", "register_runner"]


@dataclass
class RegisteredRunner:
    id: str
    name: str
    credential: str
    client: Client

    def heartbeat(self, capacity: int = 10, **status: Any) -> dict[str, Any]:
        body = {"status": {"capacity": capacity, "runtime": "test", **status}}
        result: dict[str, Any] = self.client.put(f"/api/v1/runners/{self.id}/status", body)
        return result

    def report(self, env_id: str, **status: Any) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.client.put(f"/api/v1/environments/{env_id}/status", {"status": status})
        return result


def register_runner(admin: Client, name: str, **spec: Any) -> RegisteredRunner:
    """Create a runner as the admin and trade its exchange token for a credential."""
    created = admin.post("/api/v1/runners", {"metadata": {"name": name}, "spec": spec})
    exchanged = Client(admin.server).post("/api/v1/runners/exchange", {"exchange_token": created["exchange_token"]})
    return RegisteredRunner(
        created["runner"]["metadata"]["id"], name, exchanged["token"], Client(admin.server, exchanged["token"])
    )


def make_user(admin: Client, name: str, role: str = "member", organization_id: str | None = None) -> Client:
    """A new user in the admin's organization and a client with a token of theirs."""
    metadata: dict[str, Any] = {"name": name}
    if organization_id:
        metadata["organization_id"] = organization_id
    user = admin.post("/api/v1/users", {"metadata": metadata, "role": role})
    token_body: dict[str, Any] = {"spec": {"user_id": user["metadata"]["id"]}}
    if organization_id:
        token_body["metadata"] = {"organization_id": organization_id}
    token = admin.post("/api/v1/tokens", token_body)
    return Client(admin.server, token["secret"])


def eventually(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy (then return it) or ``timeout`` passes (then fail
    with its last result or error)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except AssertionError as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s; last: {last!r}")
