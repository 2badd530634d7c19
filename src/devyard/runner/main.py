"""``run_runner``: the ``devyard runner`` process, which the CLI calls with the settings from its options.

Sets up logging, runs one ``Agent`` until SIGINT or SIGTERM, and stops it cleanly (a second signal
interrupts at once). Exits with status 2 if the server will not have this runner (a refused exchange token or
credential) or another process holds its state directory: retrying would not help, so it says why and stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from devyard.runner.agent import Agent
from devyard.runner.errors import CredentialError, StateDirInUse
from devyard.runner.host_process import watch_children_by_pidfd
from devyard.runner.settings import RunnerSettings

__all__ = ["run_runner"]

log = logging.getLogger(__name__)


def run_runner(settings: RunnerSettings) -> None:
    """Run the runner in the foreground until a signal; raises ``SystemExit(2)`` on a refused credential."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_run(settings))
    except (CredentialError, StateDirInUse) as exc:
        log.error("%s", exc)
        raise SystemExit(2) from exc


async def _run(settings: RunnerSettings) -> None:
    watch_children_by_pidfd()
    agent = Agent(settings)
    loop = asyncio.get_running_loop()

    def on_signal(number: signal.Signals) -> None:
        log.info("%s: stopping (again to interrupt at once)", number.name)
        for each in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(each)
        agent.stop()

    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, on_signal, number)
    await agent.run()
