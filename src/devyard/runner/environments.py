"""The environment reconciler: makes the runtime's container of one environment match its spec, and reports.

The agent's controller calls ``reconcile(environment_id)`` from its workers, one call per id at a time. It
reads the environment from the informer's cache (as last seen from the server) and the container from the
runtime, takes the steps from what is to what ``spec.desired_phase`` asks, and reports each phase it enters
with ``PUT /api/v1/environments/{id}/status``. It never asks why it was called.

- running: create the container if there is none (phase ``creating``), start it if it is not running
  (``starting``), then ``running`` with the Ready condition True and the timings of the steps it took
  (``pull``, ``create``, ``start``; the server adds ``schedule``). A container that exited by itself is
  started again.
- stopped: stop a running container (``stopping``), then ``stopped``; the container and its disk stay.
- deleted: delete the container (``deleting``), then ``deleted``; the server then removes the environment.
- An environment that is not in the cache (deleted, or assigned elsewhere) loses its container, but only if
  the cache is synced: while the server is unreachable nothing is removed.

Every report carries ``observed_generation``: the ``metadata.generation`` the reconcile acted on. A status
is written only when it differs from the last one seen, so a quiet environment costs no requests.

Errors: a permanent one (from the runtime, or a request the server refused) makes the phase ``failed`` with
the error as message, and the environment stays failed until its spec changes (a new generation); deletion
is always tried again. A temporary one is noted in the status message and re-raised for the controller to
retry with backoff.

Spec changes other than ``desired_phase`` (image, env) take effect when the container is next created; a
rebuild (delete, then create) is not this reconciler's to decide.

With ``dev_containers`` (the agent always gives one), an environment with content gets it fetched, its dev
container resolved and its image built or pulled before the container is made (``dev_container``), and its
lifecycle hooks run after each start (``lifecycle``), in a task of their own: the environment is ``starting``
until the hooks up to devcontainer.json's ``waitFor`` ran, then ``running``; the Hooks condition says whether
the rest ran. A hook that fails up to ``waitFor`` makes the environment ``failed`` (its container keeps running,
so that the user can look inside); one that fails later leaves it ``running`` with the Hooks condition False.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from pydantic import TypeAdapter

from devyard.client import ApiError, AsyncClient, TransportError
from devyard.runner import lifecycle, port_detection
from devyard.runner.activity import Activity
from devyard.runner.automations.executor import AutomationsExecutor
from devyard.runner.automations.file_format import AutomationsFileError
from devyard.runner.clock import Clock, SystemClock
from devyard.runner.controller import Result
from devyard.runner.dev_container import DevContainers
from devyard.runner.errors import PermanentError, TemporaryError
from devyard.runner.informer import Informer
from devyard.runner.runtime import ContainerSpec, ContainerStatus, Runtime
from devyard.wire.automations import AutomationTrigger
from devyard.wire.environment_classes import EnvironmentClass
from devyard.wire.environments import (
    AutomationAction,
    DesiredPhase,
    Environment,
    EnvironmentPhase,
    EnvironmentStatus,
    EnvironmentStatusWrite,
    PortStatus,
    SSHEndpoint,
)
from devyard.wire.meta import Condition, ConditionStatus
from devyard.wire.organizations import Organization
from devyard.wire.secrets import SecretType, SecretValue

__all__ = ["AUTOMATIONS", "HOOKS", "READY", "EnvironmentReconciler"]

log = logging.getLogger(__name__)

#: The condition this reconciler owns: True while the environment runs.
READY: Final = "Ready"
#: True once every lifecycle hook of the dev container ran for this start; False while they run or if one failed.
HOOKS: Final = "Hooks"
#: False when the automations file has problems (its message lists them); absent when there never were any.
AUTOMATIONS: Final = "Automations"
#: The timings this reconciler measures; the rest of ``status.timings`` belongs to the server.
_START_STEPS: Final = ("content", "build", "pull", "unpack", "create", "start", "hooks")
#: A start step that takes longer than this has its phase reported while it runs.
_QUIET_STEP_SECONDS: Final = 0.2
#: An organization's default image is read again after this long.
_ORGANIZATION_TTL_SECONDS: Final = 30.0
#: While a slow step runs, what the runtime says of its progress is reported at most this often.
_PROGRESS_INTERVAL_SECONDS: Final = 1.0
T = TypeVar("T")
_LABEL_PREFIX: Final = "devyard.io/"


class _StatusWriteFailed(TemporaryError):
    pass


class EnvironmentReconciler:
    kind = "Environment"

    def __init__(
        self,
        *,
        client: AsyncClient,
        runtime: Runtime,
        informer: Informer[Environment],
        default_image: str,
        clock: Clock | None = None,
        dev_containers: DevContainers | None = None,
        requeue: Callable[[str], None] | None = None,
        ssh_endpoint: Callable[[], tuple[str, int] | None] | None = None,
        activity: Activity | None = None,
        port_url: Callable[[str, int], str | None] | None = None,
    ) -> None:
        self._client = client
        self._runtime = runtime
        self._informer = informer
        self._default_image = default_image
        self._clock = clock or SystemClock()
        self._dev_containers = dev_containers
        #: Queues a reconcile of the key (the agent's work queue): how a finished hooks task asks to be looked at.
        self._requeue = requeue or (lambda key: None)
        #: Where the runner's SSH gateway listens, reported in a running environment's ``status.ssh``.
        self._ssh_endpoint = ssh_endpoint or (lambda: None)
        #: When each environment was last used through the gateways, reported as ``status.last_activity_at``.
        self._activity = activity or Activity()
        #: Where the runner's port proxy serves a port of an environment (None: no proxy), in ``status.ports``.
        self._port_url = port_url or (lambda environment_id, port: None)
        #: Environment id -> the task running its lifecycle hooks, and the hook it is at.
        self._hooks: dict[str, asyncio.Task[lifecycle.Outcome]] = {}
        self._hook_at: dict[str, str] = {}
        #: Seconds the last hooks task took, until reported.
        self._hook_seconds: dict[str, float] = {}
        #: Environment id -> its automations, while it runs; and why its automations file was refused.
        self._automations: dict[str, AutomationsExecutor] = {}
        self._automation_problems: dict[str, str] = {}
        #: Environment class id -> (cpu, memory MiB, disk GiB), or None when the runner may not read it.
        self._classes: dict[str, tuple[float, int, int] | None] = {}
        #: Organization id -> (when read, its default image).
        self._organizations: dict[str, tuple[float, str | None]] = {}

    async def reconcile(self, key: str) -> Result:
        environment = self._informer.get(key)
        container = await self._runtime.inspect(key)
        if environment is None:
            return await self._collect_garbage(key, container)
        try:
            return await self._converge(environment, container)
        except _StatusWriteFailed:
            raise
        except PermanentError as exc:
            await self._report_quietly(key, EnvironmentPhase.FAILED, message=str(exc))
            raise
        except TemporaryError as exc:
            current = self._informer.get(key)
            if current is not None:
                await self._report_quietly(key, current.status.phase, message=f"retrying: {exc}")
            raise

    async def _collect_garbage(self, key: str, container: ContainerStatus | None) -> Result:
        if container is None:
            return Result()
        if not self._informer.synced:
            return Result()  # unreachable server: keep it; the next list queues it again
        log.info("removing the container of %s: the server does not assign it to this runner", key)
        await self._runtime.delete(key)
        return Result()

    async def _converge(self, environment: Environment, container: ContainerStatus | None) -> Result:
        key = environment.metadata.id
        desired = environment.spec.desired_phase
        status = environment.status

        if desired is DesiredPhase.DELETED:
            await self._cancel_hooks(key)
            await self._stop_automations(key)
            if container is not None:
                await self._report(key, EnvironmentPhase.DELETING)
                await self._runtime.delete(key)
            if self._dev_containers is not None:
                self._dev_containers.remove(key)
            self._activity.forget(key)
            await self._report(key, EnvironmentPhase.DELETED)
            return Result()

        failed = status.phase is EnvironmentPhase.FAILED
        if failed and status.observed_generation == environment.metadata.generation:
            return Result()  # failed at this generation; a spec change will try again

        if desired is DesiredPhase.STOPPED:
            await self._cancel_hooks(key)
            await self._stop_automations(key)
            if container is not None and container.running:
                await self._report(key, EnvironmentPhase.STOPPING)
                await self._runtime.stop(key)
            await self._report(key, EnvironmentPhase.STOPPED)
            return Result()

        timings: dict[str, float] = {}
        drop: tuple[str, ...] = ()
        if container is not None and self._wants_rebuild(environment):
            await self._report(key, EnvironmentPhase.CREATING, message="rebuilding the dev container")
            await self._cancel_hooks(key)
            await self._stop_automations(key)
            await self._runtime.delete(key, keep_workspace=True)
            container = None
        if container is None:
            started = self._clock.now()
            made, before_create = await self._step(key, EnvironmentPhase.CREATING, self._make(environment))
            timings.update(before_create)
            for step, seconds in (made.timings or {"create": self._clock.now() - started}).items():
                # The image may have been pulled while the dev container was resolved: the longer figure counts.
                timings[step] = max(seconds, timings.get(step, 0.0))
            container = made
            drop = _START_STEPS
        if not container.running:
            started = self._clock.now()
            container = await self._step(key, EnvironmentPhase.STARTING, self._runtime.start(key))
            timings["start"] = self._clock.now() - started
            drop = drop or ("start", "hooks")
        return await self._after_start(environment, container, timings, drop)

    def _wants_rebuild(self, environment: Environment) -> bool:
        """Whether the spec asks for a rebuild the container was not made for."""
        if self._dev_containers is None or environment.spec.rebuild_request is None:
            return False
        return self._dev_containers.rebuild_request(environment.metadata.id) != environment.spec.rebuild_request

    async def _make(self, environment: Environment) -> tuple[ContainerStatus, dict[str, float]]:
        """Fetch, resolve and create: the container, and the seconds spent before ``create``."""
        spec, secrets = await self._container_spec(environment)
        timings: dict[str, float] = {}
        if self._dev_containers is not None:
            prepared = await self._dev_containers.prepare(environment, spec, secrets)
            spec = prepared.spec
            timings.update(prepared.timings)
        return await self._runtime.create(spec), timings

    async def _after_start(
        self, environment: Environment, container: ContainerStatus, timings: dict[str, float], drop: tuple[str, ...]
    ) -> Result:
        """Running, once the hooks up to ``waitFor`` ran; the rest run on in their task; the automations start once
        every hook ran."""
        key = environment.metadata.id
        plan = self._dev_containers.plan(key) if self._dev_containers is not None else None
        hooks: tuple[ConditionStatus, str, str] | None = None
        ready = True
        if plan is not None and plan.commands:
            assert self._dev_containers is not None
            outcome = lifecycle.pending(self._dev_containers.directory(key), plan, container)
            task = self._hooks.get(key)
            if task is not None and task.done():
                del self._hooks[key]
                self._hook_at.pop(key, None)
                if not task.cancelled() and task.exception() is not None:
                    log.error("the hooks of %s failed to run: %s", key, task.exception())
                    raise TemporaryError(f"running the lifecycle hooks: {task.exception()}")
                task = None
            if outcome.remaining and task is None:
                self._hooks[key] = asyncio.create_task(self._run_hooks(key, plan, container), name=f"hooks-{key}")
            seconds = self._hook_seconds.pop(key, None)
            if seconds is not None:
                timings["hooks"] = seconds
            if outcome.failed_hook is not None:
                hooks = (ConditionStatus.FALSE, "HookFailed", outcome.message)
            elif outcome.remaining:
                hooks = (ConditionStatus.FALSE, "Running", f"running {self._hook_at.get(key, outcome.remaining[0])}")
            else:
                hooks = (ConditionStatus.TRUE, "Done", "")
            ready = outcome.ready(plan.wait_for)
            if not ready and outcome.failed_hook is not None:
                raise PermanentError(f"{outcome.message}; see `devyard env logs {key} --stream lifecycle`")
            if outcome.done:
                await self._start_automations(key, container)
        else:
            await self._start_automations(key, container)
        phase = EnvironmentPhase.RUNNING if ready else EnvironmentPhase.STARTING
        message = "" if ready or hooks is None else hooks[2]
        await self._report(
            key,
            phase,
            message=message,
            timings=timings,
            drop_timings=drop,
            hooks=hooks,
            workspace_folder=container.spec.workdir,
        )
        return Result()

    async def _start_automations(self, key: str, container: ContainerStatus) -> None:
        """Make the environment's automations executor (once per runner process), and fire the triggers of this
        container and this start, once: what fired is kept, so a restarted runner does not run tasks again."""
        if self._dev_containers is None:
            return
        executor = self._automations.get(key)
        if executor is None:
            try:
                automations = self._dev_containers.automations(key)
            except AutomationsFileError as exc:
                self._automation_problems[key] = str(exc)
                return
            self._automation_problems.pop(key, None)
            if automations is None:
                return
            executor = AutomationsExecutor(
                self._runtime,
                key,
                automations,
                log_root=self._dev_containers.log_root,
                state_dir=self._dev_containers.directory(key) / "automations",
                on_change=lambda _: self._requeue(key),
            )
            self._automations[key] = executor
            await executor.recover()
        fired = self._dev_containers.fired_triggers(key)
        created, started = _timestamp(container.created_at), _timestamp(container.started_at)
        if fired != (created, started):
            self._dev_containers.keep_fired_triggers(key, (created, started))
            if fired is None or fired[0] != created:
                await executor.on_trigger(AutomationTrigger.POST_DEVCONTAINER_START)
            await executor.on_trigger(AutomationTrigger.POST_ENVIRONMENT_START)
        await self._handle_automation_requests(key, executor)

    async def _handle_automation_requests(self, key: str, executor: AutomationsExecutor) -> None:
        """Start or stop what people asked for, each request once (what was handled is kept across restarts)."""
        assert self._dev_containers is not None
        environment = self._informer.get(key)
        if environment is None:
            return
        handled = self._dev_containers.handled_requests(key)
        known = {status.id for status in executor.statuses()}
        for automation_id, request in environment.spec.automation_requests.items():
            if handled.get(automation_id) == request.request_id:
                continue
            handled[automation_id] = request.request_id
            self._dev_containers.keep_handled_requests(key, handled)
            if automation_id not in known:
                log.warning("%s: no automation %r to %s", key, automation_id, request.action)
            elif request.action is AutomationAction.START:
                await executor.start(automation_id)
            else:
                await executor.stop(automation_id)

    async def _stop_automations(self, key: str) -> None:
        executor = self._automations.pop(key, None)
        if executor is not None:
            await executor.stop_all()

    async def _run_hooks(
        self, key: str, plan: lifecycle.LifecyclePlan, container: ContainerStatus
    ) -> lifecycle.Outcome:
        assert self._dev_containers is not None
        started = self._clock.now()

        def at(hook: str) -> None:
            self._hook_at[key] = hook
            self._requeue(key)

        try:
            return await lifecycle.run(
                self._runtime,
                self._dev_containers.directory(key),
                plan,
                container,
                log_path=self._dev_containers.logs(key) / "lifecycle.log",
                on_hook=at,
            )
        finally:
            self._hook_seconds[key] = round(self._clock.now() - started, 3)
            self._requeue(key)

    async def _cancel_hooks(self, key: str) -> None:
        task = self._hooks.pop(key, None)
        self._hook_at.pop(key, None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def _step(self, key: str, phase: EnvironmentPhase, work: Awaitable[T]) -> T:
        """Do a step of a start; report its phase only if it takes a while. A fast start then costs one status
        write instead of three, and a slow one (a large image) still shows what it is doing at once, and then
        what the runtime says of its progress (bytes pulled), about once a second."""
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=_QUIET_STEP_SECONDS)
        try:
            if done and not task.cancelled() and task.exception() is None:
                return task.result()
            # Slow, or failed: either way the user should see which step it is at.
            await self._report(key, phase, message=self._runtime.progress(key) or "")
            while not done:
                done, _ = await asyncio.wait({task}, timeout=_PROGRESS_INTERVAL_SECONDS)
                if not done:
                    await self._report(key, phase, message=self._runtime.progress(key) or "")
        except BaseException:
            await asyncio.wait({task})  # never leave a step half-done behind an error of the report
            raise
        return await task

    async def _container_spec(self, environment: Environment) -> tuple[ContainerSpec, list[SecretValue]]:
        """The container spec from the environment's spec alone, and the environment's secrets."""
        metadata = environment.metadata
        spec = environment.spec
        cpu, memory_mib, disk_gib = await self._class_limits(spec.class_id) or (None, None, None)
        secrets = await self._secrets(metadata.id)
        env, registry_credentials = _container_secrets(secrets)
        env.update(spec.env)
        labels = {
            f"{_LABEL_PREFIX}environment": metadata.id,
            f"{_LABEL_PREFIX}name": metadata.name,
            f"{_LABEL_PREFIX}organization": metadata.organization_id or "",
        }
        container = ContainerSpec(
            environment_id=metadata.id,
            image=spec.image or await self._organization_image(metadata.organization_id) or self._default_image,
            env=env,
            cpu=cpu,
            memory_mib=memory_mib,
            disk_gib=disk_gib,
            labels=labels,
            generation=metadata.generation,
            registry_credentials=registry_credentials,
        )
        return container, secrets

    async def _organization_image(self, organization_id: str | None) -> str | None:
        """The organization's default image (its policy's ``default_image``), read at most every
        ``_ORGANIZATION_TTL_SECONDS``; None when it sets none or the runner may not read it."""
        if organization_id is None:
            return None
        cached = self._organizations.get(organization_id)
        if cached is not None and self._clock.now() - cached[0] < _ORGANIZATION_TTL_SECONDS:
            return cached[1]
        try:
            data = await self._read(f"/api/v1/organizations/{organization_id}", f"organization {organization_id}")
        except PermanentError as exc:
            log.warning("%s; using the runner's default image", exc)
            image = None
        else:
            image = Organization.model_validate(data).spec.policy.default_image
        self._organizations[organization_id] = (self._clock.now(), image)
        return image

    async def _secrets(self, key: str) -> list[SecretValue]:
        answer = await self._read(f"/api/v1/environments/{key}/secrets", f"the secrets of {key}")
        return TypeAdapter(list[SecretValue]).validate_python(answer)

    async def _class_limits(self, class_id: str | None) -> tuple[float, int, int] | None:
        if class_id is None:
            return None
        if class_id not in self._classes:
            try:
                data = await self._read(f"/api/v1/environment-classes/{class_id}", f"environment class {class_id}")
            except PermanentError as exc:
                log.warning("%s; creating without limits", exc)
                self._classes[class_id] = None
            else:
                found = EnvironmentClass.model_validate(data).spec
                self._classes[class_id] = (found.cpu, found.memory_mib, found.disk_gib)
        return self._classes[class_id]

    async def _read(self, path: str, what: str) -> Any:
        """GET ``path``; an unreachable or failing server is a TemporaryError, a refusal a PermanentError."""
        try:
            return await self._client.get(path)
        except TransportError as exc:
            raise TemporaryError(f"cannot read {what}: {exc}") from exc
        except ApiError as exc:
            if exc.status >= 500 or exc.status in (408, 429):
                raise TemporaryError(f"cannot read {what}: {exc}") from exc
            raise PermanentError(f"the server refused {what}: {exc}") from exc

    def _with_automations(self, key: str, status: EnvironmentStatus, generation: int) -> EnvironmentStatus:
        """``status`` with the automations' statuses, and the Automations condition when the file is refused."""
        executor = self._automations.get(key)
        automations = executor.statuses() if executor is not None else []
        conditions = status.conditions
        problem = self._automation_problems.get(key)
        if problem is not None:
            conditions = _with_condition(
                list(conditions), AUTOMATIONS, ConditionStatus.FALSE, "InvalidFile", problem, generation
            )
        elif any(c.type == AUTOMATIONS for c in conditions):
            conditions = _with_condition(list(conditions), AUTOMATIONS, ConditionStatus.TRUE, "Loaded", "", generation)
        if automations == status.automations and conditions == status.conditions:
            return status
        return status.model_copy(update={"automations": automations, "conditions": conditions})

    async def _ports(self, environment: Environment) -> list[PortStatus]:
        """``status.ports`` of a running environment: what listens inside, what its dev container forwards, what its
        spec shares."""
        key = environment.metadata.id
        declared = port_detection.load_declared(self._dev_containers.directory(key)) if self._dev_containers else {}
        listening = await self._runtime.listening_ports(key)
        return port_detection.port_statuses(environment, listening, declared, self._port_url)

    async def _report_quietly(self, key: str, phase: EnvironmentPhase, *, message: str) -> None:
        """Report a failure; if even that cannot be written, the log has it and a retry will report it."""
        try:
            await self._report(key, phase, message=message)
        except (TemporaryError, PermanentError) as exc:
            log.debug("cannot report %s of %s: %s", phase, key, exc)

    async def _report(
        self,
        key: str,
        phase: EnvironmentPhase,
        *,
        message: str = "",
        timings: dict[str, float] | None = None,
        drop_timings: tuple[str, ...] = (),
        hooks: tuple[ConditionStatus, str, str] | None = None,
        workspace_folder: str | None = None,
    ) -> None:
        """Write the status for ``phase`` unless the server already has it; ``workspace_folder``, when given,
        replaces the one reported (it stays through a stop: the container keeps it)."""
        environment = self._informer.get(key)
        if environment is None:
            return  # gone meanwhile; the next reconcile removes what is left
        current = environment.status
        wanted = _next_status(environment, phase, message, timings or {}, drop_timings, hooks)
        wanted = self._with_automations(key, wanted, environment.metadata.generation)
        endpoint = self._ssh_endpoint() if phase is EnvironmentPhase.RUNNING else None
        ssh = SSHEndpoint(host=endpoint[0], port=endpoint[1], user=key) if endpoint is not None else None
        if wanted.ssh != ssh:
            wanted = wanted.model_copy(update={"ssh": ssh})
        ports = await self._ports(environment) if phase is EnvironmentPhase.RUNNING else []
        if wanted.ports != ports:
            wanted = wanted.model_copy(update={"ports": ports})
        if workspace_folder is not None and wanted.workspace_folder != workspace_folder:
            wanted = wanted.model_copy(update={"workspace_folder": workspace_folder})
        reported = wanted.last_activity_at.timestamp() if wanted.last_activity_at is not None else None
        if self._activity.is_newer(key, reported):
            last = datetime.fromtimestamp(self._activity.last(key) or 0.0, UTC)
            wanted = wanted.model_copy(update={"last_activity_at": last})
        if wanted == current:
            return
        body = EnvironmentStatusWrite(status=wanted).model_dump(mode="json", exclude_none=False)
        try:
            answer = await self._client.put(f"/api/v1/environments/{key}/status", body)
        except TransportError as exc:
            raise _StatusWriteFailed(f"cannot report {phase}: {exc}") from exc
        except ApiError as exc:
            if exc.status in (403, 404):
                # Deleted, or assigned elsewhere: forget it until the server says otherwise.
                if phase is not EnvironmentPhase.DELETED:
                    log.info("%s is gone from this runner (%s)", key, exc.code)
                self._informer.discard(key)
                return
            if exc.status >= 500 or exc.status in (408, 429):
                raise _StatusWriteFailed(f"cannot report {phase}: {exc}") from exc
            raise PermanentError(f"the server refused the status {phase}: {exc}") from exc
        try:
            self._informer.update(Environment.model_validate(answer))
        except ValueError:
            self._informer.update(environment.model_copy(update={"status": wanted}))


def _timestamp(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _container_secrets(secrets: list[SecretValue]) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """What the container needs of the secrets at creation: environment variables, and registry credentials by
    host. (Git credentials are the content's business.)"""
    env: dict[str, str] = {}
    registries: dict[str, tuple[str, str]] = {}
    for secret in secrets:
        if secret.type is SecretType.ENVIRONMENT_VARIABLE:
            env[secret.target] = secret.value
        elif secret.type is SecretType.REGISTRY_CREDENTIAL:
            username, _, password = secret.value.partition(":")
            registries[secret.target] = (username, password)
    return env, registries


def _with_condition(
    conditions: list[Condition], kind: str, status: ConditionStatus, reason: str, message: str, generation: int
) -> list[Condition]:
    """``conditions`` with the one of type ``kind`` set, in place: reordering the server's list would look like a
    change, and write again and again; its transition time kept unless its status changes."""
    condition = Condition(type=kind, status=status, reason=reason, message=message, observed_generation=generation)
    previous = next((c for c in conditions if c.type == kind), None)
    if previous is not None and previous.status == condition.status:
        condition = condition.model_copy(update={"last_transition_time": previous.last_transition_time})
    else:
        condition = condition.model_copy(update={"last_transition_time": datetime.now(UTC)})
    if previous is None:
        return [*conditions, condition]
    return [condition if c.type == kind else c for c in conditions]


def _next_status(
    environment: Environment,
    phase: EnvironmentPhase,
    message: str,
    timings: dict[str, float],
    drop_timings: tuple[str, ...],
    hooks: tuple[ConditionStatus, str, str] | None = None,
) -> EnvironmentStatus:
    current = environment.status
    generation = environment.metadata.generation
    ready = ConditionStatus.TRUE if phase is EnvironmentPhase.RUNNING else ConditionStatus.FALSE
    conditions = _with_condition(list(current.conditions), READY, ready, phase.value.capitalize(), message, generation)
    if hooks is not None:
        conditions = _with_condition(conditions, HOOKS, *hooks, generation)
    merged = {k: v for k, v in current.timings.items() if k not in drop_timings}
    merged.update({k: round(v, 3) for k, v in timings.items()})
    return current.model_copy(
        update={
            "phase": phase,
            "observed_generation": generation,
            "conditions": conditions,
            "timings": merged,
            "message": message,
        }
    )
