"""Wait until an environment reaches a phase (``running``, ``stopped``) or is gone, for ``--wait`` and ``up``.

It watches the environments from a list's resource_version, so no change is missed between reading the
environment and watching it; when the server cannot watch it polls instead. An environment that fails, is
deleted, or is still short of the phase when the time is up ends the wait with a one-line error that carries
the environment's status message and its conditions that are not True.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import click

if TYPE_CHECKING:
    from devyard.client import Client

__all__ = ["DELETED", "WaitFailed", "describe_status", "wait_for_environment"]

#: The target of a wait for an environment to disappear.
DELETED: Final = "deleted"
_POLL_INTERVAL: Final = 0.5
_WATCH_SLICE: Final = 60


class WaitFailed(click.ClickException):
    """The environment did not get where it was asked to go."""


def wait_for_environment(
    client: Client,
    environment_id: str,
    target: str,
    *,
    timeout: float,
    on_change: Callable[[dict[str, Any]], None] = lambda _: None,
    written: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The environment's JSON once its phase is ``target``; None once it is gone when ``target`` is deleted.

    ``written``: the environment as the answer to a write of it (create, patch) gave it. Its resource_version is
    a point of the change feed, so the watch starts there, without the list and the read first (two requests
    fewer, which ``env create -- CMD`` counts on)."""
    from devyard.client import ApiError, TransportError

    path = f"/api/v1/environments/{environment_id}"
    deadline = time.monotonic() + timeout
    can_watch = True
    last: dict[str, Any] | None = None
    while True:
        version = (written or {}).get("metadata", {}).get("resource_version")
        if written is not None and version is not None:
            since, last, written = str(version), written, None
        else:
            # The list's resource_version first, then the environment: every change after it shows up in the watch.
            since = str(client.get("/api/v1/environments", {"page_size": 1})["resource_version"])
            try:
                last = client.get(path)
            except ApiError as exc:
                if exc.is_not_found:
                    _gone(environment_id, target)
                    return None
                raise
        assert last is not None
        on_change(last)
        if _reached(last, target):
            return None if target == DELETED else last
        if time.monotonic() >= deadline:
            raise WaitFailed(_timed_out(environment_id, target, timeout, last))
        if not can_watch:
            time.sleep(min(_POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
            continue
        try:
            remaining = max(1, int(deadline - time.monotonic()) + 1)
            events = client.watch(
                "/api/v1/environments", since, {"bookmark_seconds": 5}, timeout=min(remaining, _WATCH_SLICE)
            )
            for event in events:
                if event.type == "BOOKMARK" or event.object.get("metadata", {}).get("id") != environment_id:
                    if time.monotonic() >= deadline:
                        break
                    continue
                if event.type == "DELETED":
                    _gone(environment_id, target)
                    return None
                last = event.object
                on_change(last)
                if _reached(last, target):
                    return None if target == DELETED else last
                if time.monotonic() >= deadline:
                    break
        except ApiError as exc:
            if not exc.is_gone:
                can_watch = False  # this server cannot watch environments: poll
        except TransportError:
            time.sleep(_POLL_INTERVAL)
        if time.monotonic() >= deadline:
            raise WaitFailed(_timed_out(environment_id, target, timeout, last))


def describe_status(environment: dict[str, Any]) -> str:
    """The phase, the status message and the conditions that are not True, in one line."""
    status = environment.get("status") or {}
    parts = [f"phase {status.get('phase', 'unknown')}"]
    if status.get("message"):
        parts.append(str(status["message"]))
    troubles = [
        f"{c.get('type')}={c.get('status')}"
        + (f" ({c.get('reason')}{': ' + c['message'] if c.get('message') else ''})" if c.get("reason") else "")
        for c in status.get("conditions") or []
        if c.get("status") != "True"
    ]
    if troubles:
        parts.append("conditions: " + ", ".join(troubles))
    return "; ".join(parts)


def _reached(environment: dict[str, Any], target: str) -> bool:
    metadata = environment.get("metadata") or {}
    status = environment.get("status") or {}
    phase = status.get("phase")
    current = int(status.get("observed_generation") or 0) >= int(metadata.get("generation") or 1)
    if phase == target and (current or target == DELETED):
        # Not before the runner acted on the latest spec: a rebuild asked of a running environment is not done
        # while it still shows the old generation running.
        return True
    if phase == "failed" and current:
        raise WaitFailed(f"environment {metadata.get('id')} failed: {describe_status(environment)}")
    desired = (environment.get("spec") or {}).get("desired_phase")
    if target != DELETED and desired not in (None, target):
        raise WaitFailed(
            f"environment {metadata.get('id')} is now meant to be {desired}, no longer {target}: "
            f"{describe_status(environment)}"
        )
    return False


def _gone(environment_id: str, target: str) -> None:
    """Raise unless waiting for the environment to go."""
    if target == DELETED:
        return
    raise WaitFailed(f"environment {environment_id} was deleted while waiting for it to be {target}")


def _timed_out(environment_id: str, target: str, timeout: float, last: dict[str, Any] | None) -> str:
    detail = describe_status(last) if last is not None else "no status"
    return f"environment {environment_id} is not {target} after {timeout:g}s: {detail}"
