"""What the port proxy's tests share: the test application run inside a fake environment, and a proxy in front of
it whose questions to the management plane are answered from a table (the end-to-end test asks the real one)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devyard.runner.activity import Activity
from devyard.runner.fake_runtime import FakeRuntime
from devyard.runner.ports import Identity, PortAccess, PortProxy, TokenRefused
from devyard.runner.runtime import ContainerSpec, ExecProcess, ExecRequest, Runtime
from devyard.wire.environments import Environment

APP = Path(__file__).with_name("app.py")
RUNNER = "run_01test"
KEY = b"k" * 32
OWNER, MEMBER, STRANGER = "usr_owner", "usr_member", "usr_stranger"
ORG, OTHER_ORG = "org_one", "org_two"
TOKENS = {
    "dyu_owner": Identity(OWNER, frozenset({ORG})),
    "dyu_member": Identity(MEMBER, frozenset({ORG})),
    "dyu_stranger": Identity(STRANGER, frozenset({OTHER_ORG})),
}


def environment(
    environment_id: str, *, ports: list[dict[str, Any]] | None = None, phase: str = "running"
) -> Environment:
    stamp = "2026-01-01T00:00:00Z"
    return Environment.model_validate(
        {
            "metadata": {
                "id": environment_id,
                "name": environment_id,
                "organization_id": ORG,
                "creator_id": OWNER,
                "generation": 1,
                "resource_version": "1",
                "created_at": stamp,
                "updated_at": stamp,
            },
            "spec": {"ports": ports or []},
            "status": {"phase": phase, "runner_id": RUNNER},
        }
    )


async def start_app(runtime: Runtime, environment_id: str) -> tuple[ExecProcess, int, int]:
    """Run the test application inside: the process, its HTTP and its WebSocket port."""
    process = await runtime.open_exec(environment_id, ExecRequest(argv=[sys.executable, str(APP)]))
    line = await asyncio.wait_for(process.stdout.readline(), 20)
    http, websocket = map(int, line.split())
    return process, http, websocket


@dataclass
class ProxyWorld:
    runtime: FakeRuntime
    proxy: PortProxy
    environments: dict[str, Environment]
    http: int
    websocket: int
    activity: Activity
    public_ports: dict[str, bool] = field(default_factory=lambda: {ORG: True})
    whoami_calls: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"


async def make_world(tmp_path: Path, **proxy_options: Any) -> AsyncIterator[ProxyWorld]:
    runtime = FakeRuntime(state_file=tmp_path / "fake-runtime.json")
    environments = {
        "env_01app": environment("env_01app"),
        "env_01stopped": environment("env_01stopped", phase="stopped"),
    }
    await runtime.create(ContainerSpec(environment_id="env_01app", image="debian"))
    await runtime.start("env_01app")
    app, http, websocket = await start_app(runtime, "env_01app")
    world_box: list[ProxyWorld] = []

    async def whoami(token: str) -> Identity:
        world_box[0].whoami_calls.append(token)
        if token not in TOKENS:
            raise TokenRefused("unknown token")
        return TOKENS[token]

    async def allows_public_ports(organization_id: str) -> bool:
        return world_box[0].public_ports[organization_id]

    access = PortAccess(RUNNER, KEY, environments.get, whoami, allows_public_ports)
    activity = Activity()
    proxy = PortProxy(runtime, access, listen="127.0.0.1:0", activity=activity, **proxy_options)
    await proxy.start()
    world = ProxyWorld(runtime, proxy, environments, http, websocket, activity)
    world_box.append(world)
    try:
        yield world
    finally:
        await proxy.close()
        await runtime.close()  # kills the application
        await asyncio.wait_for(app.wait(), 20)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[ProxyWorld]:
    async for made in make_world(tmp_path):
        yield made
