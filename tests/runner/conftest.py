"""Fixtures and helpers of the runner's tests: fast settings, a fake server, and waiting for a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from devyard.client import RetryPolicy
from devyard.runner.agent import Agent
from devyard.runner.settings import RunnerSettings

from .fake_server import FakeServer

FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02)
FAKE_URL = "http://devyard.test"


def fast_settings(
    state_dir: Path, *, server: str = FAKE_URL, token: str | None = None, **changes: Any
) -> RunnerSettings:
    """Settings whose every interval is short, so tests wait for fractions of a second."""
    values: dict[str, Any] = {
        "server": server,
        "exchange_token": token,
        "state_dir": state_dir,
        "runtime": "fake",
        "workers": 4,
        "hostname": "test-host",
        "heartbeat_interval": 0.2,
        "resync_interval": 0.5,
        "bookmark_interval": 0.2,
        "retry_base": 0.01,
        "retry_max": 0.1,
        "reconnect_base": 0.01,
        "reconnect_max": 0.1,
        # No gateway unless a test asks for one (``gateway_listen="127.0.0.1:0"``).
        "gateway_listen": "",
        **changes,
    }
    return RunnerSettings(**values)


async def eventually(predicate: Callable[[], bool], *, timeout: float = 5.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def holds(predicate: Callable[[], bool], *, duration: float, what: str = "condition") -> None:
    """Check that ``predicate()`` keeps holding for ``duration`` seconds."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert predicate(), f"{what} stopped holding"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    """Run the agent in the background; stop it, and check it stopped cleanly, on leaving."""
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=10)


@pytest.fixture
def fake_server() -> FakeServer:
    """A fake management plane; distinct from ``server`` (the real one, in ``tests/conftest.py``)."""
    return FakeServer()
