"""Automations: the status of an environment's services and tasks, as its runner reports them.

The runner's automations executor (``devyard.runner.automations``) makes these; the runner puts the list in the
environment's ``status.automations``, and ``devyard env get`` shows it. A service runs for as long as the
environment does (``pending`` until started, then ``starting``, ``ready``, and ``stopping``, ``stopped`` or
``failed``); a task runs once per trigger (``pending``, ``running``, then ``succeeded``, ``failed`` or
``skipped`` when a task it depends on did not succeed).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Final

from pydantic import model_validator

from devyard.wire.meta import ReadModel

__all__ = [
    "SERVICE_PHASES",
    "TASK_PHASES",
    "AutomationKind",
    "AutomationPhase",
    "AutomationStatus",
    "AutomationTrigger",
]


class AutomationKind(enum.StrEnum):
    SERVICE = "service"
    TASK = "task"


class AutomationTrigger(enum.StrEnum):
    """When an automation runs, as the automations file names it (Gitpod's names)."""

    #: After the dev container is made or rebuilt.
    POST_DEVCONTAINER_START = "postDevcontainerStart"
    #: On every start of the environment.
    POST_ENVIRONMENT_START = "postEnvironmentStart"
    #: When a user asks for it.
    MANUAL = "manual"


class AutomationPhase(enum.StrEnum):
    PENDING = "pending"
    # Services.
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    # Tasks.
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    # Both.
    FAILED = "failed"


SERVICE_PHASES: Final = frozenset(
    {
        AutomationPhase.PENDING,
        AutomationPhase.STARTING,
        AutomationPhase.READY,
        AutomationPhase.FAILED,
        AutomationPhase.STOPPING,
        AutomationPhase.STOPPED,
    }
)
TASK_PHASES: Final = frozenset(
    {
        AutomationPhase.PENDING,
        AutomationPhase.RUNNING,
        AutomationPhase.SUCCEEDED,
        AutomationPhase.FAILED,
        AutomationPhase.SKIPPED,
    }
)


class AutomationStatus(ReadModel):
    """Where one service or task stands, as of its latest run."""

    #: Its id in the automations file.
    id: str
    kind: AutomationKind
    name: str = ""
    description: str = ""
    phase: AutomationPhase = AutomationPhase.PENDING
    #: The exit code of its latest run (a service's start command, or a task's command), once it exited.
    exit_code: int | None = None
    #: Why it is in its phase, for a person: ``not ready within 60 s``, ``not run: build failed``.
    message: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: What started its latest run; None while it never ran.
    triggered_by: AutomationTrigger | None = None

    @model_validator(mode="after")
    def _phase_of_kind(self) -> AutomationStatus:
        allowed = SERVICE_PHASES if self.kind is AutomationKind.SERVICE else TASK_PHASES
        if self.phase not in allowed:
            raise ValueError(f"a {self.kind.value} cannot be {self.phase.value}")
        return self
