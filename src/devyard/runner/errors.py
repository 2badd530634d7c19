"""The runner's errors, classified once: temporary (retry after a delay) or permanent (stop and report).

Raised by runtimes and reconcilers; read by the one executor in ``controller`` that decides what happens
next. Anything else that escapes a reconciler is unknown and is treated as temporary with capped backoff.
"""

from __future__ import annotations

import enum

__all__ = [
    "ContainerNotFound",
    "ContainerNotRunning",
    "CredentialError",
    "ErrorClass",
    "PermanentError",
    "RunnerError",
    "StateDirInUse",
    "TemporaryError",
    "classify",
]


class RunnerError(Exception):
    """The base of the runner's own errors."""


class TemporaryError(RunnerError):
    """A failure that may pass by itself: try again after a delay (``retry_after`` seconds when known)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(RunnerError):
    """A failure that will not pass by retrying: stop and report it (an environment goes ``failed``)."""


class ContainerNotFound(TemporaryError):
    """The runtime has no container for that environment; the caller's view was stale, so look again."""


class ContainerNotRunning(PermanentError):
    """An operation that needs a running container (exec) found it created or stopped."""


class CredentialError(PermanentError):
    """The runner cannot get or use its credential: the exchange token or the credential was refused."""


class StateDirInUse(PermanentError):
    """Another process (a runner, or ``doctor --fix``) holds the runner's state directory."""


class ErrorClass(enum.Enum):
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    UNKNOWN = "unknown"


def classify(exc: BaseException) -> ErrorClass:
    """What kind of failure ``exc`` is; the executor treats UNKNOWN like TEMPORARY but logs a traceback."""
    if isinstance(exc, TemporaryError):
        return ErrorClass.TEMPORARY
    if isinstance(exc, PermanentError):
        return ErrorClass.PERMANENT
    return ErrorClass.UNKNOWN
