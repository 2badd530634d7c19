"""M fake runners in one process: ``python -m bench.api.fleet``, started by the benchmark through
``running_fleet``.

The process registers each runner as the admin (``POST /api/v1/runners``), then runs one real
``devyard.runner.agent.Agent`` per runner on one event loop, with the fake runtime (operations take no time)
and default intervals: each trades its exchange token, heartbeats, lists and watches its environments and
reconciles them to running. It prints ``ready`` once every agent is synced and has heartbeated, and stops
its agents when it gets SIGTERM, when its standard input closes (the benchmark went away), or after
``--lifetime`` seconds, whichever comes first; last it prints ``stats {json}``: reconciles, failures, lists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.api import event_loop

__all__ = ["Fleet", "running_fleet"]

_REPO = Path(__file__).resolve().parents[2]
_STOP_TIMEOUT = 30.0


@dataclass
class Fleet:
    pid: int
    runners: int
    #: What the fleet printed when it stopped; empty until the ``running_fleet`` block has ended.
    stats: dict[str, Any] = field(default_factory=dict)


@contextmanager
def running_fleet(
    server: str,
    admin_token: str,
    *,
    runners: int,
    capacity: int,
    state_dir: Path,
    log_path: Path,
    ready_timeout: float,
    lifetime: float,
) -> Iterator[Fleet]:
    """Start the fleet and wait until it is ready; on exit stop it and collect its stats."""
    command = [sys.executable, "-m", "bench.api.fleet", "--server", server, "--runners", str(runners)]
    command += ["--capacity", str(capacity), "--state-dir", str(state_dir), "--lifetime", str(lifetime)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, cwd=_REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
    assert process.stdin is not None and process.stdout is not None
    fleet = Fleet(process.pid, runners)
    try:
        process.stdin.write(admin_token + "\n")
        process.stdin.flush()
        deadline = time.monotonic() + ready_timeout
        while True:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([process.stdout], [], [], max(remaining, 0))
            line = process.stdout.readline() if readable else ""
            if line.strip() == "ready":
                break
            if not readable or not line:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the runner fleet did not get ready within {ready_timeout:.0f} s:\n{tail}")
        yield fleet
    finally:
        process.send_signal(signal.SIGTERM)
        try:  # communicate() also closes the fleet's standard input, which stops it too
            output, _ = process.communicate(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        for line in output.splitlines():
            if line.startswith("stats "):
                fleet.stats = json.loads(line.removeprefix("stats "))


async def _run_fleet(options: argparse.Namespace, admin_token: str, stop: asyncio.Event) -> dict[str, Any]:
    from devyard.client import AsyncClient, RetryPolicy
    from devyard.runner.agent import Agent
    from devyard.runner.settings import RunnerSettings

    agents: list[Agent] = []
    async with AsyncClient(options.server, admin_token, retry=RetryPolicy(attempts=3)) as admin:
        for number in range(options.runners):
            name = f"bench-runner-{number:03d}"
            created = await admin.post("/api/v1/runners", {"metadata": {"name": name}})
            settings = RunnerSettings(
                server=options.server,
                exchange_token=created["exchange_token"],
                state_dir=options.state_dir / name,
                hostname=name,
                capacity=options.capacity,
                runtime="fake",
                fake_persist=False,
                gateway_listen="",  # fifty gateways in one process would only cost sockets
                log_level="WARNING",
            )
            agents.append(Agent(settings, stop_grace=2.0))
    tasks = [asyncio.create_task(agent.run(), name=f"agent-{n}") for n, agent in enumerate(agents)]
    try:
        deadline = time.monotonic() + options.lifetime
        while not all(agent.synced and agent.heartbeats > 0 for agent in agents):
            failed = next((task for task in tasks if task.done()), None)
            if failed is not None:
                failed.result()
                raise RuntimeError(f"{failed.get_name()} ended before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError("the agents did not get ready before the fleet's lifetime ended")
            await asyncio.sleep(0.05)
        print("ready", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(deadline - time.monotonic(), 0))
    finally:
        for agent in agents:
            agent.stop()
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_TIMEOUT / 2)
    stats: dict[str, Any] = {"runners": len(agents), "reconciles": 0, "temporary_failures": 0}
    stats.update(permanent_failures=0, unknown_failures=0, lists=0, heartbeats=0, agents_failed=0)
    for agent, task in zip(agents, tasks, strict=True):
        if task.done() and not task.cancelled() and task.exception() is not None:
            stats["agents_failed"] += 1
        if agent.controller is not None:
            for key in ("reconciles", "temporary_failures", "permanent_failures", "unknown_failures"):
                stats[key] += getattr(agent.controller.stats, key)
        stats["lists"] += agent.informer.lists if agent.informer is not None else 0
        stats["heartbeats"] += agent.heartbeats
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--runners", type=int, required=True)
    parser.add_argument("--capacity", type=int, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--lifetime", type=float, required=True)
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    admin_token = sys.stdin.readline().strip()

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, stop.set)

        def wait_for_end_of_input() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_end_of_input, daemon=True).start()
        return await _run_fleet(options, admin_token, stop)

    stats = event_loop.run(run())
    print("stats " + json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
