"""A small fake of the management plane for the runner's unit tests, behind the real client's interface.

It answers, through ``httpx.MockTransport``, the few endpoints a runner uses (``docs/api.md``): the token
exchange, the runner heartbeat, list and watch of environments, environment status writes, an
environment's secrets (from ``secrets``), and the organization (its ``default_image``). Tests drive the
user's side with plain methods (``create_environment``, ``set_desired``, ``delete_environment``) and make the
server go away and come back. Tests assert on its resulting state, never on the requests it saw.

The real server is exercised by ``test_agent_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import httpx

from devyard.wire.environments import (
    DesiredPhase,
    Environment,
    EnvironmentPhase,
    EnvironmentSpec,
    EnvironmentStatus,
    EnvironmentStatusWrite,
)
from devyard.wire.ids import new_id
from devyard.wire.meta import Metadata
from devyard.wire.organizations import Organization, OrganizationPolicy, OrganizationSpec, OrganizationStatus
from devyard.wire.runners import RunnerStatusWrite

__all__ = ["FakeServer"]


@dataclass
class _Change:
    version: int
    type: str
    environment: Environment
    runner_ids: frozenset[str | None]


class FakeServer:
    def __init__(self, organization_id: str = "org_test") -> None:
        self.organization_id = organization_id
        self.version = 0
        self.environments: dict[str, Environment] = {}
        #: Status writes per environment, to check that a quiet environment costs no writes.
        self.status_writes: dict[str, int] = {}
        self.heartbeats: dict[str, int] = {}
        self.runner_status: dict[str, Any] = {}
        #: The organization's policy's default image.
        self.default_image: str | None = None
        #: Environment id -> the secrets its runner receives (``wire.secrets.SecretValue`` as JSON).
        self.secrets: dict[str, list[dict[str, str]]] = {}
        self.down = False
        self._exchange_tokens: dict[str, str] = {}
        self._credentials: dict[str, str] = {}
        self._changes: list[_Change] = []
        self._oldest = 0
        self._changed = asyncio.Event()

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    # The administrator's and users' side.

    def create_runner(self) -> tuple[str, str]:
        """A new runner: its id and a one-time exchange token."""
        runner_id = new_id("Runner")
        token = "ex_" + secrets.token_urlsafe(16)
        self._exchange_tokens[token] = runner_id
        return runner_id, token

    def create_environment(
        self, runner_id: str | None, desired: DesiredPhase = DesiredPhase.RUNNING, **spec: Any
    ) -> str:
        self.version += 1
        now = datetime.now(UTC)
        environment_id = new_id("Environment")
        environment = Environment(
            metadata=Metadata(
                id=environment_id,
                name=f"env-{len(self.environments)}",
                organization_id=self.organization_id,
                created_at=now,
                updated_at=now,
                generation=1,
                resource_version=str(self.version),
            ),
            spec=EnvironmentSpec(desired_phase=desired, **spec),
            status=EnvironmentStatus(runner_id=runner_id),
        )
        self.environments[environment_id] = environment
        self._record("ADDED", environment, {runner_id})
        return environment_id

    def set_desired(self, environment_id: str, desired: DesiredPhase) -> None:
        current = self.environments[environment_id]
        self._write(
            current,
            spec=current.spec.model_copy(update={"desired_phase": desired}),
            generation=current.metadata.generation + 1,
        )

    def delete_environment(self, environment_id: str) -> None:
        current = self.environments[environment_id]
        if current.status.runner_id is None:
            self._remove(current)
        else:
            self.set_desired(environment_id, DesiredPhase.DELETED)

    def remove_environment(self, environment_id: str) -> None:
        """Remove the record outright, as an administrator's force delete would."""
        self._remove(self.environments[environment_id])

    def reassign(self, environment_id: str, runner_id: str | None) -> None:
        current = self.environments[environment_id]
        status = current.status.model_copy(update={"runner_id": runner_id})
        self._write(current, status=status, also_notify={current.status.runner_id})

    def phase(self, environment_id: str) -> EnvironmentPhase | None:
        environment = self.environments.get(environment_id)
        return None if environment is None else environment.status.phase

    def go_down(self) -> None:
        """Refuse connections and break every open watch."""
        self.down = True
        self._notify()

    def come_back(self) -> None:
        self.down = False

    def forget_history(self) -> None:
        """Drop the change history, so that every watch from an older version gets 410 Gone."""
        self._changes.clear()
        self.version += 1  # as if changes were made and compacted away before any watcher saw them
        self._oldest = self.version
        self._notify()

    # Inside.

    def _record(self, kind: str, environment: Environment, runner_ids: set[str | None]) -> None:
        self._changes.append(_Change(self.version, kind, environment, frozenset(runner_ids)))
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _write(
        self,
        current: Environment,
        *,
        spec: EnvironmentSpec | None = None,
        status: EnvironmentStatus | None = None,
        generation: int | None = None,
        also_notify: set[str | None] | None = None,
    ) -> Environment:
        self.version += 1
        metadata = current.metadata.model_copy(
            update={
                "resource_version": str(self.version),
                "updated_at": datetime.now(UTC),
                "generation": generation or current.metadata.generation,
            }
        )
        updated = current.model_copy(
            update={"metadata": metadata, "spec": spec or current.spec, "status": status or current.status}
        )
        self.environments[current.metadata.id] = updated
        self._record("MODIFIED", updated, {updated.status.runner_id, *(also_notify or set())})
        return updated

    def _remove(self, current: Environment) -> None:
        self.version += 1
        del self.environments[current.metadata.id]
        metadata = current.metadata.model_copy(update={"resource_version": str(self.version)})
        gone = current.model_copy(update={"metadata": metadata})
        self._record("DELETED", gone, {current.status.runner_id})

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        method = request.method
        if method == "POST" and path == "/api/v1/runners/exchange":
            return self._exchange(json.loads(request.content))
        runner_id = self._credentials.get(request.headers.get("Authorization", "").removeprefix("Bearer "))
        if runner_id is None:
            return _error(401, "unauthenticated", "no valid credential")
        parts = path.strip("/").split("/")
        if method == "PUT" and len(parts) == 5 and parts[2] == "runners" and parts[4] == "status":
            if parts[3] != runner_id:
                return _error(403, "forbidden", "not this runner")
            write = RunnerStatusWrite.model_validate_json(request.content)
            self.heartbeats[runner_id] = self.heartbeats.get(runner_id, 0) + 1
            self.runner_status[runner_id] = write.status
            return httpx.Response(200, json={"ok": True})
        if method == "GET" and path == "/api/v1/environments":
            query = {key: values[-1] for key, values in parse_qs(request.url.query.decode()).items()}
            if query.get("runner_id") != runner_id:
                return _error(403, "forbidden", "runners list their own environments")
            if query.get("watch") == "true":
                return self._watch(runner_id, int(query["resource_version"]), float(query["bookmark_seconds"]))
            return self._list(runner_id, int(query.get("page_size", "100")), int(query.get("page_token", "0")))
        if method == "PUT" and len(parts) == 5 and parts[2] == "environments" and parts[4] == "status":
            return self._write_status(runner_id, parts[3], request.content)
        if method == "GET" and len(parts) == 4 and parts[2] == "organizations":
            if parts[3] != self.organization_id:
                return _error(404, "not_found", f"organization {parts[3]} not found")
            return httpx.Response(200, json=self._organization())
        if method == "GET" and len(parts) == 5 and parts[2] == "environments" and parts[4] == "secrets":
            environment = self.environments.get(parts[3])
            if environment is None or environment.status.runner_id != runner_id:
                return _error(404, "not_found", f"environment {parts[3]} not found")
            return httpx.Response(200, json=self.secrets.get(parts[3], []))
        return _error(404, "not_found", f"no route {method} {path}")

    def _organization(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        organization = Organization(
            metadata=Metadata(
                id=self.organization_id,
                name="test",
                created_at=now,
                updated_at=now,
                generation=1,
                resource_version="1",
            ),
            spec=OrganizationSpec(policy=OrganizationPolicy(default_image=self.default_image)),
            status=OrganizationStatus(),
        )
        return organization.model_dump(mode="json")

    def _exchange(self, body: dict[str, Any]) -> httpx.Response:
        runner_id = self._exchange_tokens.pop(body.get("exchange_token", ""), None)
        if runner_id is None:
            return _error(401, "unauthenticated", "unknown or spent exchange token")
        token = "run_" + secrets.token_urlsafe(16)
        self._credentials[token] = runner_id
        return httpx.Response(
            200, json={"runner_id": runner_id, "organization_id": self.organization_id, "token": token}
        )

    def _list(self, runner_id: str, page_size: int, offset: int) -> httpx.Response:
        mine = sorted(
            (e for e in self.environments.values() if e.status.runner_id == runner_id),
            key=lambda e: e.metadata.id,
        )
        page = mine[offset : offset + page_size]
        more = offset + page_size < len(mine)
        return httpx.Response(
            200,
            json={
                "items": [e.model_dump(mode="json") for e in page],
                "resource_version": str(self.version),
                "next_page_token": str(offset + page_size) if more else None,
            },
        )

    def _watch(self, runner_id: str, since: int, bookmark_seconds: float) -> httpx.Response:
        if since < self._oldest:
            return _error(410, "gone", "too old a resource_version")
        return httpx.Response(
            200,
            headers={"Content-Type": "application/x-ndjson"},
            content=self._stream(runner_id, since, bookmark_seconds),
        )

    async def _stream(self, runner_id: str, since: int, bookmark_seconds: float) -> AsyncIterator[bytes]:
        position = since
        while True:
            changed = self._changed
            if self.down:
                raise httpx.ReadError("connection reset")
            if position < self._oldest:
                error = {"error": {"code": "gone", "message": "history dropped"}}
                yield _line({"type": "ERROR", "object": error})
                return
            for change in self._changes:
                if change.version <= position:
                    continue
                position = change.version
                if runner_id in change.runner_ids:
                    yield _line({"type": change.type, "object": change.environment.model_dump(mode="json")})
            try:
                # Not wait_for: on Python 3.11 it swallows a cancellation that races with the event.
                async with asyncio.timeout(bookmark_seconds):
                    await changed.wait()
            except TimeoutError:
                position = max(position, self.version)
                yield _line({"type": "BOOKMARK", "object": {"metadata": {"resource_version": str(position)}}})

    def _write_status(self, runner_id: str, environment_id: str, content: bytes) -> httpx.Response:
        current = self.environments.get(environment_id)
        if current is None:
            return _error(404, "not_found", f"no environment {environment_id}")
        if current.status.runner_id != runner_id:
            return _error(403, "forbidden", "not assigned to this runner")
        write = EnvironmentStatusWrite.model_validate_json(content)
        status = write.status.model_copy(update={"runner_id": current.status.runner_id})
        self.status_writes[environment_id] = self.status_writes.get(environment_id, 0) + 1
        updated = self._write(current, status=status)
        if status.phase is EnvironmentPhase.DELETED:
            self._remove(updated)
        return httpx.Response(200, json=updated.model_dump(mode="json"))


def _line(document: dict[str, Any]) -> bytes:
    return (json.dumps(document) + "\n").encode()


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "details": None}})
