"""``devyard runner doctor``: compare a runner host's state with what it should be, and report or fix it.

The CLI (``devyard runner doctor``) calls ``examine`` with the runner's settings; tests call it directly. Two
comparisons:

- host-level: what no record explains, and steps a killed runner left half-done (``LinuxRuntime.orphans``, which
  includes the network's): runc containers, mounts, cgroups, network namespaces, veths, address allocations;
- desired against actual: with the runner's credential from its state directory, the environments the server
  assigns to this runner (``GET /api/v1/environments?runner_id=ME``, every page) against its containers: a
  container the server does not assign (the runner would delete it), an environment that should run and does
  not, or should be stopped or deleted and is not (the runner would converge it; doctor only reports it).

With ``fix``: ``repair`` (runtime and network), the deletion of containers the server no longer assigns to this
runner (only after a complete list from the server), and the image store's ``gc``; then everything is looked
at again, and the report's findings are what remains. A fix takes ``state_lock`` on the state directory first
and refuses (``DoctorRefused``) while a runner holds it: two processes repairing at once would fight.
When the server cannot be reached (or refuses the credential), nothing of the desired state is judged and
nothing but host-level orphans is touched.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import pydantic

from devyard.client import ApiError, AsyncClient, RetryPolicy, TransportError
from devyard.runner import credentials, state_lock
from devyard.runner.errors import PermanentError, RunnerError
from devyard.runner.runtime import ContainerStatus, Runtime
from devyard.runner.settings import RunnerSettings
from devyard.wire.environments import DesiredPhase, Environment, EnvironmentPhase

if TYPE_CHECKING:
    from devyard.runner.images.store import ImageStore

__all__ = ["DoctorRefused", "DoctorReport", "Finding", "FindingStatus", "examine"]

_SERVER_RETRY: Final = RetryPolicy(attempts=2, base_delay=0.2, max_delay=1.0)
_SERVER_TIMEOUT_SECONDS: Final = 10.0


class DoctorRefused(PermanentError):
    """``fix`` was asked while another process (a running runner) holds the state directory's lock."""


class FindingStatus(enum.StrEnum):
    OK = "ok"
    #: On the host, explained by no record, or a step a killed runner left half-done.
    ORPHAN = "orphan"
    #: The host differs from what the server asks of this runner.
    DRIFT = "drift"
    #: Not compared: the server could not be asked.
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Finding:
    #: What kind of thing: ``environment``, ``container``, ``mount``, ``runc``, ``cgroup``, ``directory``,
    #: ``step`` (half-done) or ``network``.
    what: str
    #: Which one: an environment id or a path.
    where: str
    status: FindingStatus
    detail: str = ""
    #: What ``fix`` did about it: ``fixed``, ``remains``, or empty without ``fix``.
    fix: str = ""

    @property
    def difference(self) -> bool:
        return self.status in (FindingStatus.ORPHAN, FindingStatus.DRIFT)

    def key(self) -> tuple[str, str, str]:
        return self.what, self.where, self.status.value

    def to_json(self) -> dict[str, str]:
        return {
            "what": self.what,
            "where": self.where,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class DoctorReport:
    state_dir: Path
    runtime: str
    server: str
    #: Whether the server gave a complete list of this runner's environments.
    server_reachable: bool
    #: Why not, when it did not.
    server_message: str = ""
    runner_id: str | None = None
    #: The pid of the runner holding the state directory, if one runs (what it is doing may show as orphans).
    runner_pid: int | None = None
    #: What was found (before any fix), each with what the fix did.
    findings: tuple[Finding, ...] = ()
    #: With ``fix``: one line per thing done.
    fixed: tuple[str, ...] = ()
    #: With ``fix``: differences found when looking again afterwards (found by nobody before, say).
    remaining: tuple[Finding, ...] = field(default=())
    fix_asked: bool = False

    @property
    def clean(self) -> bool:
        """No differences: none found, or (with ``fix``) none left."""
        if self.fix_asked:
            return not any(finding.difference for finding in self.remaining)
        return not any(finding.difference for finding in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "state_dir": str(self.state_dir),
            "runtime": self.runtime,
            "server": self.server,
            "server_reachable": self.server_reachable,
            "server_message": self.server_message,
            "runner_id": self.runner_id,
            "runner_pid": self.runner_pid,
            "clean": self.clean,
            "findings": [finding.to_json() for finding in self.findings],
            "fixed": list(self.fixed),
            "remaining": [finding.to_json() for finding in self.remaining if finding.difference],
        }


async def examine(
    settings: RunnerSettings,
    *,
    fix: bool = False,
    runtime: Runtime | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> DoctorReport:
    """Compare the host of the runner that ``settings`` describe with what it should be; with ``fix``, repair it
    and look again. ``runtime`` and ``transport`` replace the defaults, for tests. Raises ``DoctorRefused`` when
    ``fix`` is asked while a runner holds the state directory."""
    lock = None
    if fix:
        lock = state_lock.hold(settings.state_dir)
        if lock is None:
            raise DoctorRefused(
                f"a runner (pid {state_lock.holder(settings.state_dir)}) is running on {settings.state_dir}; "
                "stop it before --fix (it repairs the host itself when it starts)"
            )
    try:
        return await _examine(settings, fix=fix, runtime=runtime, transport=transport)
    finally:
        if lock is not None:
            lock.close()


async def _examine(
    settings: RunnerSettings, *, fix: bool, runtime: Runtime | None, transport: httpx.AsyncBaseTransport | None
) -> DoctorReport:
    from devyard.runner.agent import make_runtime

    runner_pid = None if fix else state_lock.holder(settings.state_dir)
    own_runtime = runtime is None
    runtime = runtime if runtime is not None else make_runtime(settings)
    try:
        server, runner_id, desired, server_message = await _desired(settings, transport)
        found = await _survey(runtime, desired)
        fixed: list[str] = []
        remaining: list[Finding] = []
        if fix:
            fixed = await _fix(runtime, desired)
            remaining = await _survey(runtime, desired)
            left = {finding.key() for finding in remaining if finding.difference}
            found = [
                replace(finding, fix="remains" if finding.key() in left else "fixed") if finding.difference else finding
                for finding in found
            ]
            known = {finding.key() for finding in found}
            remaining = [finding for finding in remaining if finding.difference]
            found += [replace(finding, fix="remains") for finding in remaining if finding.key() not in known]
        return DoctorReport(
            state_dir=settings.state_dir,
            runtime=runtime.name,
            server=server,
            server_reachable=desired is not None,
            server_message=server_message,
            runner_id=runner_id,
            runner_pid=runner_pid,
            findings=tuple(found),
            fixed=tuple(fixed),
            remaining=tuple(remaining),
            fix_asked=fix,
        )
    finally:
        if own_runtime:
            await runtime.close()
            _close_image_store(runtime)


async def _desired(
    settings: RunnerSettings, transport: httpx.AsyncBaseTransport | None
) -> tuple[str, str | None, dict[str, Environment] | None, str]:
    """(the server's URL, this runner's id, the environments the server assigns to it or None, why None)."""
    server = _server_url(settings)
    try:
        credential = credentials.load(settings.credential_path())
    except RunnerError as exc:
        return server, None, None, str(exc)
    if credential is None:
        return server, None, None, f"no credential in {settings.credential_path()}: the runner never registered"
    runner_id = credential.runner_id
    client = AsyncClient(
        server, credential.token, timeout=_SERVER_TIMEOUT_SECONDS, retry=_SERVER_RETRY, transport=transport
    )
    try:
        items, _ = await client.list_all("/api/v1/environments", {"runner_id": runner_id})
        environments = [Environment.model_validate(item) for item in items]
    except TransportError as exc:
        return server, runner_id, None, f"cannot reach the server {server}: {exc}"
    except ApiError as exc:
        return server, runner_id, None, f"the server {server} refused the list of environments: {exc}"
    except pydantic.ValidationError as exc:
        return server, runner_id, None, f"the server {server} sent environments this runner cannot read: {exc}"
    finally:
        await client.aclose()
    # As the agent's informer does: the list is by runner, but only what the server says is ours counts.
    mine = {e.metadata.id: e for e in environments if e.status.runner_id == runner_id}
    return server, runner_id, mine, ""


def _server_url(settings: RunnerSettings) -> str:
    """The server given to doctor (option or environment), else the one the credential was obtained from."""
    if "server" in settings.model_fields_set:
        return settings.server
    try:
        document = json.loads(settings.credential_path().read_text())
    except (OSError, ValueError):
        return settings.server
    stored = document.get("server") if isinstance(document, dict) else None
    return stored if isinstance(stored, str) and stored else settings.server


async def _survey(runtime: Runtime, desired: dict[str, Environment] | None) -> list[Finding]:
    findings = await _host_orphans(runtime)
    containers = {container.environment_id: container for container in await runtime.list()}
    if desired is None:
        findings += [
            Finding("container", i, FindingStatus.UNKNOWN, f"{c.state.value}; not compared: no list from the server")
            for i, c in sorted(containers.items())
        ]
        return findings
    for environment_id, environment in sorted(desired.items()):
        findings.append(_compare(environment, containers.get(environment_id)))
    for environment_id, container in sorted(containers.items()):
        if environment_id not in desired:
            findings.append(
                Finding(
                    "container",
                    environment_id,
                    FindingStatus.DRIFT,
                    f"{container.state.value}, but the server does not assign it to this runner (to delete)",
                )
            )
    return findings


def _compare(environment: Environment, container: ContainerStatus | None) -> Finding:
    environment_id = environment.metadata.id
    desired = environment.spec.desired_phase
    status = environment.status
    actual = container.state.value if container is not None else "no container"

    def finding(state: FindingStatus, detail: str) -> Finding:
        return Finding("environment", environment_id, state, detail)

    if desired is DesiredPhase.DELETED:
        if container is None:
            return finding(FindingStatus.OK, "deleted")
        return finding(FindingStatus.DRIFT, f"should be deleted; container {actual}")
    if status.phase is EnvironmentPhase.FAILED and status.observed_generation == environment.metadata.generation:
        # The runner leaves a failed environment alone until its spec changes; nothing to converge.
        return finding(FindingStatus.OK, f"failed ({status.message}); container {actual}")
    if desired is DesiredPhase.STOPPED:
        if container is not None and container.running:
            return finding(FindingStatus.DRIFT, "should be stopped; container running")
        return finding(FindingStatus.OK, f"stopped; container {actual}")
    if container is None or not container.running:
        return finding(FindingStatus.DRIFT, f"should be running; {actual}")
    return finding(FindingStatus.OK, "running")


async def _host_orphans(runtime: Runtime) -> list[Finding]:
    from devyard.runner.linux.runtime import LinuxRuntime

    if not isinstance(runtime, LinuxRuntime):
        return []
    return [_orphan(line) for line in await runtime.orphans()]


# What LinuxRuntime.orphans says, by the start of its line, and the kind of thing it is; where it is follows ": ".
_ORPHAN_KINDS: Final[Sequence[tuple[str, str]]] = (
    ("environment directory", "directory"),
    ("mount", "mount"),
    ("runc container", "runc"),
    ("cgroup", "cgroup"),
    ("interrupted", "step"),
    ("container exited", "step"),
    ("container missing", "step"),
)


def _orphan(line: str) -> Finding:
    for prefix, what in _ORPHAN_KINDS:
        if line.startswith(prefix):
            detail, _, where = line.rpartition(": ")
            return Finding(what, where.split(" (")[0], FindingStatus.ORPHAN, detail)
    # The network's lines are its repair steps ("undo the half-made network of env_x (...)").
    return Finding("network", "", FindingStatus.ORPHAN, line)


async def _fix(runtime: Runtime, desired: dict[str, Environment] | None) -> list[str]:
    fixed = list(await runtime.repair())
    if desired is not None:
        for container in await runtime.list():
            if container.environment_id not in desired:
                await runtime.delete(container.environment_id)
                fixed.append(f"{container.environment_id}: deleted its container; the server does not assign it here")
    store = _image_store(runtime)
    if store is not None:
        collected = await store.gc()
        if collected.images or collected.blobs or collected.layers or collected.temporary:
            fixed.append(
                f"image store: removed {collected.images} images, {collected.blobs} blobs, {collected.layers} layers "
                f"and {collected.temporary} leftovers of interrupted pulls"
            )
    return fixed


def _image_store(runtime: Runtime) -> ImageStore | None:
    from devyard.runner.images.store import ImageStore
    from devyard.runner.linux.runtime import LinuxRuntime

    if isinstance(runtime, LinuxRuntime) and isinstance(runtime.images, ImageStore):
        return runtime.images
    return None


def _close_image_store(runtime: Runtime) -> None:
    store = _image_store(runtime)
    if store is not None:
        store.close()
