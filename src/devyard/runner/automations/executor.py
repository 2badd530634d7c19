"""``AutomationsExecutor``: runs one environment's services and tasks inside it and reports where they stand.

The environment reconciler makes one executor per running environment with the environment's parsed
automations (``file_format``) and calls ``recover`` once, then ``on_trigger`` when the container was made or
rebuilt (``postDevcontainerStart``) and at every start of the environment (``postEnvironmentStart``), ``start``
and ``stop`` when a user asks, and ``stop_all`` before it stops the environment. Each change of an automation's
status goes to the ``on_change`` callback (the reconciler reports ``statuses()`` to the server).

Everything runs through ``Runtime.open_exec`` with the container's defaults: the dev container's remote user,
its environment and its workspace folder. Commands are shell strings (``/bin/sh -c``). Each command is started
through a small shell wrapper that prints its process id and start time (from ``/proc``) on the first line of
its output and then ``exec``s the command, so the runner knows the process inside the container by a name that
survives the runner: stopping signals that process and all its descendants (a shell's children would otherwise
outlive it), from inside the container, by a second small script that walks ``/proc``.

Services: ``starting`` until the ``ready`` command exits 0 (polled every ``ready_interval``; without one, ready
once started), then ``ready``; ``failed`` when the start command exits, or when it is not ready within
``ready_timeout`` (then it is stopped); ``stopping`` then ``stopped`` when asked to stop: the ``stop`` command if
there is one, else SIGTERM, then SIGKILL after ``stop_grace``. Tasks run in dependency order, each as soon as
the tasks it depends on succeeded, independent ones at once; a task whose dependency did not succeed is
``skipped`` and says why. A task already running when it is asked for again is not started twice.

A runner restart: while a service or task runs, a record of its process (id and start time) is kept in
``state_dir``. The output of that process goes through pipes held by the runner process, which die with it, so
a process found still alive after a restart cannot be watched or heard any more (and would die of SIGPIPE on its
next write): ``recover`` stops it (its process tree) and starts the service again; a task it interrupted is
reported ``failed``. Nothing is left running that the runner does not watch.

Each automation's output goes to its log (``logs.log_path``), a header line per run. Every coroutine the
executor starts is guarded: an exception is logged with its traceback and the automation reported ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from devyard.runner.atomic_file import write_atomically
from devyard.runner.automations.file_format import Automations, Service, Task
from devyard.runner.automations.logs import DEFAULT_LOG_LIMIT, LogWriter, log_path
from devyard.runner.errors import ContainerNotRunning, RunnerError
from devyard.runner.runtime import ExecProcess, ExecRequest, Runtime
from devyard.wire.automations import AutomationKind, AutomationPhase, AutomationStatus, AutomationTrigger

__all__ = ["AutomationsExecutor", "ExecutorSettings", "StatusCallback"]

log = logging.getLogger(__name__)

StatusCallback = Callable[[AutomationStatus], None]

#: The first line a wrapped command prints: ``devyard-automation PID STARTTIME``.
_MARKER: Final = "devyard-automation"
#: Prints the shell's pid and start time (field 22 of /proc/PID/stat, after the command name, which may hold
#: spaces), then becomes the command: same process, same pid and start time.
_WRAPPER: Final = """command=$1
read -r stat < /proc/$$/stat
set -- ${stat##*) }
echo "devyard-automation $$ ${20}"
exec /bin/sh -c "$command"
"""
#: Sends signal $1 to process $2 (only if it started at $3) and every descendant of it; exit 3 when that
#: process is gone (0 as the signal only asks whether it is alive).
_SIGNAL_TREE: Final = """sig=$1 root=$2 want=$3
info() { read -r s 2>/dev/null < "/proc/$1/stat" || return 1; set -- ${s##*) }; parent=$2; start=${20}; }
info "$root" || exit 3
[ -z "$want" ] || [ "$start" = "$want" ] || exit 3
pids=" $root "
more=1
while [ "$more" = 1 ]; do
  more=0
  for entry in /proc/[0-9]*; do
    pid=${entry#/proc/}
    case $pids in *" $pid "*) continue ;; esac
    info "$pid" || continue
    case $pids in *" $parent "*) pids="$pids$pid " more=1 ;; esac
  done
done
[ "$sig" = 0 ] && exit 0
kill -s "$sig" $pids 2>/dev/null
exit 0
"""
#: Seconds a wrapped command gets to print its first line.
_MARKER_TIMEOUT: Final = 30.0
#: Seconds a helper script (a signal, a probe's kill) may take.
_HELPER_TIMEOUT: Final = 30.0
#: The bytes of a command's last output kept for its failure message.
_TAIL_BYTES: Final = 400

_TRANSITIONAL: Final = frozenset({AutomationPhase.STARTING, AutomationPhase.RUNNING, AutomationPhase.STOPPING})


@dataclass(frozen=True)
class ExecutorSettings:
    #: Seconds a service may take to become ready before it is failed and stopped.
    ready_timeout: float = 300.0
    #: Seconds between runs of a service's ready command.
    ready_interval: float = 1.0
    #: Seconds a stopping service gets (for its stop command, then after SIGTERM) before it is killed.
    stop_grace: float = 10.0
    log_limit: int = DEFAULT_LOG_LIMIT


@dataclass(frozen=True)
class _ProcessId:
    """A process inside the container, by a name that outlives the runner: its pid and start time."""

    pid: int
    start_time: str


class _Slot:
    """One automation: its status and, while it runs, its process and the coroutine watching it."""

    def __init__(self, status: AutomationStatus, writer: LogWriter) -> None:
        self.status = status
        self.writer = writer
        self.process: ExecProcess | None = None
        #: Copies the process's output and returns its exit code, while it runs.
        self.output: asyncio.Task[int] | None = None
        self.process_id: _ProcessId | None = None
        self.worker: asyncio.Task[bool] | None = None
        self.stopping = False
        self.lock = asyncio.Lock()
        #: The end of the latest run's output, for its failure message.
        self.tail = b""
        #: Set once the latest run's process started (or could not): a stop waits for it to have one to signal.
        self.launched = asyncio.Event()

    @property
    def active(self) -> bool:
        return self.worker is not None and not self.worker.done()


class AutomationsExecutor:
    """Runs the automations of one environment; see the module's docstring."""

    def __init__(
        self,
        runtime: Runtime,
        environment_id: str,
        automations: Automations,
        *,
        log_root: Path,
        state_dir: Path,
        on_change: StatusCallback | None = None,
        settings: ExecutorSettings | None = None,
    ) -> None:
        self._runtime = runtime
        self._environment_id = environment_id
        self._automations = automations
        self._state_dir = state_dir
        self._on_change = on_change
        self._settings = settings or ExecutorSettings()
        self._changed = asyncio.Condition()
        self._slots: dict[str, _Slot] = {}
        for kind, entries in ((AutomationKind.SERVICE, automations.services), (AutomationKind.TASK, automations.tasks)):
            for entry in entries:
                status = AutomationStatus(id=entry.id, kind=kind, name=entry.name, description=entry.description)
                writer = LogWriter(log_path(log_root, environment_id, entry.id), limit=self._settings.log_limit)
                self._slots[entry.id] = _Slot(status, writer)

    def statuses(self) -> list[AutomationStatus]:
        """Every automation's status: services, then tasks, in the file's order."""
        return [slot.status for slot in self._slots.values()]

    def status(self, automation_id: str) -> AutomationStatus:
        return self._slot(automation_id).status

    async def on_trigger(self, trigger: AutomationTrigger) -> None:
        """Start the services and run the tasks (with what they depend on) that ``trigger`` starts; returns once
        they are started, not when they are done (``wait_idle``)."""
        for service in self._automations.services_for(trigger):
            await self._start_service(service, trigger)
        tasks = self._automations.tasks_for(trigger)
        if tasks:
            self._start_tasks([task.id for task in tasks], trigger)

    async def start(self, automation_id: str, *, trigger: AutomationTrigger = AutomationTrigger.MANUAL) -> None:
        """Start one service, or run one task after the tasks it depends on; nothing if it is already running.
        Raises ``KeyError`` for an unknown id."""
        self._slot(automation_id)
        service = self._automations.service(automation_id)
        if service is not None:
            await self._start_service(service, trigger)
        else:
            self._start_tasks([automation_id], trigger)

    async def stop(self, automation_id: str) -> None:
        """Stop a service or a running task and wait until it is gone; nothing if it is not running."""
        slot = self._slot(automation_id)
        service = self._automations.service(automation_id)
        async with slot.lock:
            if not slot.active:
                return
            slot.stopping = True
            if service is not None:
                self._set(slot, phase=AutomationPhase.STOPPING, message="stopping")
                await self._stop_service(service, slot)
            elif slot.status.phase is AutomationPhase.PENDING and slot.worker is not None:
                # Still waiting for what it depends on: it never ran.
                slot.worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await slot.worker
                self._set(slot, phase=AutomationPhase.FAILED, message="stopped before it ran", finished_at=_now())
            else:
                await self._terminate(slot, self._settings.stop_grace)
            if slot.worker is not None:
                await asyncio.wait([slot.worker], timeout=self._settings.stop_grace)

    async def stop_all(self) -> None:
        """Stop every service and running task (before the environment stops)."""
        await asyncio.gather(*(self._guarded(self.stop(automation_id), automation_id) for automation_id in self._slots))

    async def wait_idle(self) -> None:
        """Wait until no task runs and no service is starting or stopping."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    not any(
                        slot.status.phase in _TRANSITIONAL
                        or (slot.active and slot.status.phase is AutomationPhase.PENDING)
                        for slot in self._slots.values()
                    )
                )
            )

    async def recover(self) -> None:
        """Deal with the processes a previous runner process left running (see the module's docstring): stop
        them, start their services again, report their tasks failed. Call once, before anything else."""
        for automation_id, slot in self._slots.items():
            record = self._read_record(automation_id)
            if record is None:
                continue
            process_id, trigger = record
            if await self._signal_tree(process_id, "0"):
                log.info("stopping %s of %s, left by a previous runner process", automation_id, self._environment_id)
                await slot.writer.line("the runner restarted: stopping what it can no longer watch")
                await self._signal_tree(process_id, "TERM")
                await self._wait_gone(process_id, self._settings.stop_grace)
                await self._signal_tree(process_id, "KILL")
            self._forget(automation_id)
            service = self._automations.service(automation_id)
            if service is not None:
                await self._start_service(service, trigger)
            else:
                self._set(
                    slot,
                    phase=AutomationPhase.FAILED,
                    message="interrupted: the runner restarted while it ran",
                    triggered_by=trigger,
                    finished_at=_now(),
                )

    # Services.

    async def _start_service(self, service: Service, trigger: AutomationTrigger) -> None:
        slot = self._slots[service.id]
        async with slot.lock:
            if slot.active:
                return
            slot.stopping = False
            slot.launched.clear()
            self._set(
                slot,
                phase=AutomationPhase.STARTING,
                message="starting",
                exit_code=None,
                started_at=_now(),
                finished_at=None,
                triggered_by=trigger,
            )
            slot.worker = asyncio.create_task(self._guarded(self._run_service(service, slot, trigger), service.id))

    async def _run_service(self, service: Service, slot: _Slot, trigger: AutomationTrigger) -> bool:
        await slot.writer.line(f"{_now():%Y-%m-%d %H:%M:%S} starting {service.id} ({trigger.value}): {service.start}")
        output = await self._launch(slot, service.start, trigger)
        if output is None:
            return False
        if service.ready is None:
            self._set(slot, phase=AutomationPhase.READY, message="")
        elif not await self._wait_ready(service, slot, output):
            return False
        exit_code = await output
        self._finish(slot)
        if slot.stopping:
            self._set(slot, phase=AutomationPhase.STOPPED, message="", exit_code=exit_code, finished_at=_now())
            return True
        message = f"exited with {exit_code}" + _tail_suffix(slot)
        self._set(slot, phase=AutomationPhase.FAILED, message=message, exit_code=exit_code, finished_at=_now())
        return False

    async def _wait_ready(self, service: Service, slot: _Slot, output: asyncio.Task[int]) -> bool:
        """Poll the ready command until it succeeds (True), the service exits or stops, or time runs out."""
        assert service.ready is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.ready_timeout
        last = ""
        while not output.done() and not slot.stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            probe = await self._run_helper(["/bin/sh", "-c", service.ready], timeout=remaining)
            if probe is not None and probe[0] == 0:
                self._set(slot, phase=AutomationPhase.READY, message="")
                return True
            if probe is not None and probe[1].strip():
                last = probe[1].decode(errors="replace").strip().splitlines()[-1]
            await asyncio.wait([output], timeout=min(self._settings.ready_interval, max(0.0, deadline - loop.time())))
        if output.done() or slot.stopping:
            exit_code = await output
            self._finish(slot)
            if slot.stopping:
                self._set(slot, phase=AutomationPhase.STOPPED, message="", exit_code=exit_code, finished_at=_now())
                return False
            message = f"exited with {exit_code} before it was ready" + _tail_suffix(slot)
            self._set(slot, phase=AutomationPhase.FAILED, message=message, exit_code=exit_code, finished_at=_now())
            return False
        timeout = self._settings.ready_timeout
        message = f"not ready within {timeout:g} s" + (f" (the ready command said: {last})" if last else "")
        await slot.writer.line(message + "; stopping it")
        self._set(slot, message=message)
        await self._terminate(slot, self._settings.stop_grace)
        exit_code = await output
        self._finish(slot)
        self._set(slot, phase=AutomationPhase.FAILED, message=message, exit_code=exit_code, finished_at=_now())
        return False

    async def _stop_service(self, service: Service, slot: _Slot) -> None:
        grace = self._settings.stop_grace
        if service.stop is not None:
            await slot.writer.line(f"stopping {service.id}: {service.stop}")
            result = await self._run_helper(["/bin/sh", "-c", service.stop], timeout=grace, writer=slot.writer)
            if result is None:
                await slot.writer.line(f"the stop command did not finish within {grace:g} s")
            if slot.worker is not None:
                await asyncio.wait([slot.worker], timeout=grace)
            if not slot.active:
                return
            await slot.writer.line("still running after the stop command: terminating it")
        await self._terminate(slot, grace)

    # Tasks.

    def _start_tasks(self, task_ids: Sequence[str], trigger: AutomationTrigger) -> None:
        """Run ``task_ids`` and what they depend on, each once its dependencies are done."""
        workers: dict[str, asyncio.Task[bool]] = {}
        for task in self._automations.task_order(task_ids):
            slot = self._slots[task.id]
            if slot.active and slot.worker is not None:
                workers[task.id] = slot.worker  # already running: its dependants wait for that run
                continue
            slot.stopping = False
            slot.launched.clear()
            self._set(
                slot,
                phase=AutomationPhase.PENDING,
                message="waiting for " + ", ".join(task.depends_on) if task.depends_on else "",
                exit_code=None,
                started_at=None,
                finished_at=None,
                triggered_by=trigger,
            )
            dependencies = {dependency: workers[dependency] for dependency in task.depends_on}
            slot.worker = asyncio.create_task(self._guarded(self._run_task(task, slot, trigger, dependencies), task.id))
            workers[task.id] = slot.worker

    async def _run_task(
        self, task: Task, slot: _Slot, trigger: AutomationTrigger, dependencies: dict[str, asyncio.Task[bool]]
    ) -> bool:
        for dependency, worker in dependencies.items():
            succeeded = await asyncio.shield(worker)
            if not succeeded:
                phase = self._slots[dependency].status.phase.value
                message = f"not run: '{dependency}', which it depends on, {_phase_words(phase)}"
                await slot.writer.line(message)
                self._set(slot, phase=AutomationPhase.SKIPPED, message=message, finished_at=_now())
                return False
        if slot.stopping:
            self._set(slot, phase=AutomationPhase.FAILED, message="stopped before it ran", finished_at=_now())
            return False
        self._set(slot, phase=AutomationPhase.RUNNING, message="", started_at=_now())
        await slot.writer.line(f"{_now():%Y-%m-%d %H:%M:%S} running {task.id} ({trigger.value}): {task.command}")
        output = await self._launch(slot, task.command, trigger)
        if output is None:
            return False
        exit_code = await output
        self._finish(slot)
        if exit_code == 0:
            self._set(slot, phase=AutomationPhase.SUCCEEDED, message="", exit_code=0, finished_at=_now())
            return True
        message = "stopped" if slot.stopping else f"exited with {exit_code}" + _tail_suffix(slot)
        self._set(slot, phase=AutomationPhase.FAILED, message=message, exit_code=exit_code, finished_at=_now())
        return False

    # Processes.

    async def _launch(self, slot: _Slot, command: str, trigger: AutomationTrigger) -> asyncio.Task[int] | None:
        """Start ``command`` for ``slot``; a task that copies its output to the log and returns its exit code, or
        None when it could not be started (the slot is then failed)."""
        request = ExecRequest(argv=["/bin/sh", "-c", _WRAPPER, _MARKER, command])
        slot.launched.clear()
        try:
            process = await self._runtime.open_exec(self._environment_id, request)
        except RunnerError as exc:
            message = f"could not start: {exc}"
            await slot.writer.line(message)
            self._set(slot, phase=AutomationPhase.FAILED, message=message, finished_at=_now())
            slot.launched.set()
            return None
        process.stdin.close()
        slot.process, slot.tail = process, b""
        try:
            first = await asyncio.wait_for(process.stdout.readline(), _MARKER_TIMEOUT)
        except TimeoutError:
            first = b""
        process_id = _parse_marker(first)
        if process_id is None:
            await slot.writer.write(first)  # not ours: the process is not what we started
        else:
            slot.process_id = process_id
            self._write_record(slot.status.id, process_id, trigger)
        slot.output = asyncio.create_task(self._copy_output(slot, process))
        slot.launched.set()
        return slot.output

    async def _copy_output(self, slot: _Slot, process: ExecProcess) -> int:
        async def copy(stream: asyncio.StreamReader) -> None:
            while chunk := await stream.read(64 * 1024):
                await slot.writer.write(chunk)
                slot.tail = (slot.tail + chunk)[-_TAIL_BYTES:]

        streams = [process.stdout] + ([process.stderr] if process.stderr is not None else [])
        await asyncio.gather(*(copy(stream) for stream in streams))
        exit_code = await process.wait()
        await slot.writer.line(f"{_now():%Y-%m-%d %H:%M:%S} exited with {exit_code}")
        return exit_code

    def _finish(self, slot: _Slot) -> None:
        slot.process, slot.process_id = None, None
        self._forget(slot.status.id)

    async def _terminate(self, slot: _Slot, grace: float) -> None:
        """SIGTERM to the slot's process and its descendants, then SIGKILL after ``grace`` seconds."""
        if slot.active and not slot.launched.is_set():
            # Asked to stop while its process is being started: wait for a process to signal.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slot.launched.wait(), _MARKER_TIMEOUT)
        process_id, process = slot.process_id, slot.process
        if process is None:
            return
        if process_id is None or not await self._signal_tree(process_id, "TERM"):
            await process.signal(signal.SIGTERM)
        # The process's end, not the worker's: the worker itself terminates a service that never got ready.
        if slot.output is not None:
            await asyncio.wait([slot.output], timeout=grace)
            if slot.output.done():
                return
        await slot.writer.line(f"still running {grace:g} s after SIGTERM: killing it")
        if process_id is None or not await self._signal_tree(process_id, "KILL"):
            await process.signal(signal.SIGKILL)

    async def _signal_tree(self, process_id: _ProcessId, name: str) -> bool:
        """Send signal ``name`` (``0``: none) to the process and its descendants; whether it was alive."""
        argv = ["/bin/sh", "-c", _SIGNAL_TREE, _MARKER, name, str(process_id.pid), process_id.start_time]
        result = await self._run_helper(argv, timeout=_HELPER_TIMEOUT)
        return result is not None and result[0] == 0

    async def _wait_gone(self, process_id: _ProcessId, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Polled: the process is not ours to wait for (its parent was the previous runner's exec).
        while loop.time() < deadline and await self._signal_tree(process_id, "0"):  # noqa: ASYNC110
            await asyncio.sleep(min(0.2, timeout))

    async def _run_helper(
        self, argv: Sequence[str], *, timeout: float, writer: LogWriter | None = None
    ) -> tuple[int, bytes] | None:
        """Run a short command to its end: its exit code and its last output (also to ``writer`` if given), or
        None when it could not run or did not finish within ``timeout`` seconds (then it is killed)."""
        try:
            process = await self._runtime.open_exec(self._environment_id, ExecRequest(argv=list(argv)))
        except ContainerNotRunning:
            return None
        except RunnerError as exc:
            log.warning("cannot run a command in %s: %s", self._environment_id, exc)
            return None
        process.stdin.close()
        tail = bytearray()

        async def copy(stream: asyncio.StreamReader) -> None:
            while chunk := await stream.read(64 * 1024):
                if writer is not None:
                    await writer.write(chunk)
                tail.extend(chunk)
                del tail[:-_TAIL_BYTES]

        streams = [process.stdout] + ([process.stderr] if process.stderr is not None else [])

        async def finish() -> int:
            await asyncio.gather(*(copy(stream) for stream in streams))
            return await process.wait()

        try:
            exit_code = await asyncio.wait_for(finish(), timeout)
        except TimeoutError:
            await process.signal(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), _HELPER_TIMEOUT)
            return None
        return exit_code, bytes(tail)

    # Records of running processes, for a restarted runner.

    def _record_path(self, automation_id: str) -> Path:
        return self._state_dir / f"{automation_id}.json"

    def _write_record(self, automation_id: str, process_id: _ProcessId, trigger: AutomationTrigger) -> None:
        document = {"pid": process_id.pid, "start_time": process_id.start_time, "triggered_by": trigger.value}
        write_atomically(self._record_path(automation_id), json.dumps(document).encode(), mode=0o600)

    def _read_record(self, automation_id: str) -> tuple[_ProcessId, AutomationTrigger] | None:
        path = self._record_path(automation_id)
        try:
            document: Any = json.loads(path.read_text())
            process_id = _ProcessId(int(document["pid"]), str(document["start_time"]))
            return process_id, AutomationTrigger(document["triggered_by"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the damaged process record %s: %s", path, exc)
            return None

    def _forget(self, automation_id: str) -> None:
        self._record_path(automation_id).unlink(missing_ok=True)

    # Status.

    def _slot(self, automation_id: str) -> _Slot:
        try:
            return self._slots[automation_id]
        except KeyError:
            raise KeyError(f"no automation {automation_id!r} in {self._automations.source or 'the file'}") from None

    def _set(self, slot: _Slot, **changes: object) -> None:
        updated = slot.status.model_copy(update=changes)
        if updated == slot.status:
            return
        slot.status = updated
        if self._on_change is not None:
            try:
                self._on_change(updated)
            except Exception:
                log.exception("the status callback failed for %s of %s", updated.id, self._environment_id)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _guarded(self, work: Awaitable[bool | None], automation_id: str) -> bool:
        """``work``, with any exception logged and the automation failed instead of lost."""
        try:
            return bool(await work)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("automation %s of %s failed unexpectedly", automation_id, self._environment_id)
            slot = self._slots.get(automation_id)
            if slot is not None:
                self._set(slot, phase=AutomationPhase.FAILED, message=f"internal error: {exc}", finished_at=_now())
            return False


def _parse_marker(line: bytes) -> _ProcessId | None:
    parts = line.decode(errors="replace").split()
    if len(parts) == 3 and parts[0] == _MARKER and parts[1].isdigit():
        return _ProcessId(int(parts[1]), parts[2])
    if len(parts) == 2 and parts[0] == _MARKER and parts[1].isdigit():
        return _ProcessId(int(parts[1]), "")
    return None


def _tail_suffix(slot: _Slot) -> str:
    lines = slot.tail.decode(errors="replace").strip().splitlines()
    return f": {lines[-1]}" if lines else ""


def _phase_words(phase: str) -> str:
    return {"failed": "failed", "skipped": "was skipped"}.get(phase, f"is {phase}")


def _now() -> datetime:
    return datetime.now(UTC)
