"""When people last used each environment: the runner's side of idle timeouts.

The gateways (SSH sessions and forwards, exec WebSockets, the port proxy) call ``Activity.touch`` whenever bytes
pass for an environment. The environment reconciler reports ``Activity.last`` as ``status.last_activity_at``, and
the management plane stops an environment whose last activity is older than its timeout
(``devyard.server.loops.stop_idle``).

Touches come with every chunk of a session's data, so they must cost nothing: a touch writes one number. Only
the first touch after ``granularity`` seconds calls ``on_due`` (the agent queues a reconcile), so a busy session
makes one status write a minute at most, and the reported time is never more than ``granularity`` behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["REPORT_GRANULARITY", "Activity"]

#: Seconds between two reports of one environment's activity.
REPORT_GRANULARITY: Final = 60.0


class Activity:
    """Last activity per environment id, in seconds since the epoch."""

    def __init__(
        self,
        on_due: Callable[[str], None] | None = None,
        *,
        granularity: float = REPORT_GRANULARITY,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._on_due = on_due or (lambda environment_id: None)
        self._granularity = granularity
        self._now = now
        self._last: dict[str, float] = {}
        self._announced: dict[str, float] = {}

    def touch(self, environment_id: str) -> None:
        now = self._now()
        self._last[environment_id] = now
        if now - self._announced.get(environment_id, float("-inf")) >= self._granularity:
            self._announced[environment_id] = now
            self._on_due(environment_id)

    def last(self, environment_id: str) -> float | None:
        """When ``environment_id`` was last used since the runner started, or None."""
        return self._last.get(environment_id)

    def is_newer(self, environment_id: str, reported: float | None) -> bool:
        """Whether the activity known here is newer than ``reported`` (None: nothing reported) by more than the
        second that a round trip through the status may cost."""
        last = self._last.get(environment_id)
        if last is None:
            return False
        return reported is None or last > reported + 1.0

    def forget(self, environment_id: str) -> None:
        self._last.pop(environment_id, None)
        self._announced.pop(environment_id, None)
