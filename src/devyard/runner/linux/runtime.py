"""``LinuxRuntime``: the ``Runtime`` of a Linux host, each environment a runc container on an overlayfs root.

The agent builds one when ``RunnerSettings.runtime`` is ``linux``; a future ``devyard runner doctor`` calls its
``repair`` and ``orphans``.

On disk, under ``<state_dir>``:

- ``runc/``: runc's state root (``runc --root``), so devyard's containers are its own;
- ``environments/<id>/``: ``upper/`` and ``work/`` (the environment's disk, kept across stop and start),
  ``workspace/`` (its content, bound at the workspace mount's target; given once to ``workspace_owner``, noted
  in ``workspace.owner``), ``volumes/<name>/`` (its named volumes),
  ``rootfs/`` (the overlay, mounted while a runc container exists), ``config.json`` (the OCI bundle),
  ``hosts`` and ``resolv.conf`` (bound read-only into the container), ``console.log`` (PID 1's output), and
  ``record.json``: the ContainerSpec, the image, timings, times, exit code, and the ``intent`` (created,
  running, stopped) of the last step asked for. It is written atomically and only by the steps below.

PID 1 (decided once here, documented in ``init_process``): the image's entrypoint and command, unless that is
empty or a bare shell (``bash``, ``/bin/sh -l``...): a dev environment must stay up, so then PID 1 is a
keep-alive loop of the image's own ``/bin/sh`` that exits 0 on SIGTERM. Nothing is injected into the image.

Network: every container gets a new network namespace from runc, owned by its user namespace (runc 1.1's
``exec`` enters the user namespace first, and from there may not enter one the host owns). After ``runc
create`` the runtime bind-mounts that namespace at ``<network.netns_dir>/<id>`` and calls ``network.attach``,
which keeps a namespace it finds mounted there and wires its veth into it; the resolv.conf and hosts files are
then rewritten in place. ``stop`` detaches (the namespace dies with the container), so the address may change
across a restart; ``delete`` detaches too. Without a network the namespace has loopback only.

Crash safety: a runner killed at any point leaves something the next call (or ``repair``) finishes or undoes:

- ``create`` writes the record last, so an environment directory without a record is an incomplete create
  (or a delete that had started: ``delete`` removes the record first); either way it is torn down;
- ``start`` and ``stop`` write their intent into the record first; ``repair`` finishes them (starts a
  container left ``created`` by a start, kills and unmounts one a stop had reached);
- runc containers, mounts and cgroups that no record explains are removed.

Exit codes: runc's detached PID 1 is not the runner's child, so its exit status is not observable from here.
``stop`` reports 0 when the stop signal ended the container and 137 when it had to be killed; a container that
exited by itself reports None.

``disk_gib`` is not enforced yet (it needs project quotas under the state directory).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import shutil
import signal
import socket
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from devyard.runner import container_files, port_detection
from devyard.runner.atomic_file import write_atomically
from devyard.runner.errors import ContainerNotFound, ContainerNotRunning, PermanentError, TemporaryError
from devyard.runner.host_process import HostProcess, start_host_process
from devyard.runner.images.image import ImageConfig, ImageSource, Progress
from devyard.runner.linux import cgroups, oci_config, seccomp
from devyard.runner.linux.network import Network
from devyard.runner.linux.runc import ContainerInfo, Runc
from devyard.runner.runtime import (
    ContainerSpec,
    ContainerState,
    ContainerStatus,
    ExecRequest,
    ExecResult,
    ListeningPort,
    MountKind,
)

__all__ = ["KEEP_ALIVE", "SHELLS", "LinuxRuntime", "init_process"]

#: PID 1 of an environment whose image runs no program of its own: sleeps until SIGTERM, then exits 0 at once.
KEEP_ALIVE: Final[tuple[str, ...]] = ("/bin/sh", "-c", 'trap "exit 0" TERM; while :; do sleep 3600 & wait $!; done')
#: Program names that, alone or with options only, make an image's command "a shell" rather than a service.
SHELLS: Final = frozenset({"sh", "bash", "ash", "dash", "zsh", "ksh", "mksh", "fish", "tcsh", "csh"})

_FORMAT_VERSION: Final = 1
_ENVIRONMENT_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LIVE: Final = frozenset({"running", "paused"})
_KILLED_EXIT_CODE: Final = 128 + signal.SIGKILL
_KILL_WAIT_SECONDS: Final = 10.0
_VOLUME_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DEFAULT_PATH: Final = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def init_process(config: ImageConfig) -> tuple[str, ...]:
    """The argv of an environment's PID 1: the image's entrypoint + command, or ``KEEP_ALIVE`` when that is
    empty or a bare shell (a shell with nothing but options such as ``-l``, and no ``-c``)."""
    command = (*config.entrypoint, *config.cmd)
    if not command:
        return KEEP_ALIVE
    program, *arguments = command
    if os.path.basename(program) in SHELLS and all(a.startswith("-") and "c" not in a for a in arguments):
        return KEEP_ALIVE
    return command


@dataclass(frozen=True)
class _Record:
    spec: ContainerSpec
    image_digest: str
    layers: tuple[str, ...]
    image_config: ImageConfig
    created_at: datetime
    #: The last step asked for: ``created``, ``running`` or ``stopped``.
    intent: str = "created"
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    timings: Mapping[str, float] = field(default_factory=dict)


class LinuxRuntime:
    """Runs each environment as a runc container; see the module's docstring for the layout and the rules."""

    name = "linux"

    def __init__(
        self,
        state_dir: Path,
        *,
        images: ImageSource,
        network: Network | None = None,
        stop_timeout: float = 10.0,
        runc: str = "runc",
        cgroup_parent: str = "devyard",
        pids_limit: int = cgroups.DEFAULT_PIDS_LIMIT,
        binds: Sequence[oci_config.BindMount] = (),
    ) -> None:
        self.state_dir = state_dir
        self.images = images
        self.network = network
        self.stop_timeout = stop_timeout
        self.cgroup_parent = cgroup_parent.strip("/")
        self.pids_limit = pids_limit
        #: Host paths bound into every container (read-only unless said otherwise); for tests and operators.
        self.binds = tuple(binds)
        self.runc = Runc(state_dir / "runc", binary=runc)
        self._environments = state_dir / "environments"
        # runc reaches each bundle from inside the container's user namespace, as an unprivileged id: every
        # directory above a root file system must be searchable by others (its contents need not be readable).
        # The operator's directories above ``state_dir`` must be too, as /var/lib is.
        self._environments.mkdir(parents=True, exist_ok=True)
        for directory in (state_dir, self._environments):
            mode = directory.stat().st_mode
            if mode & 0o011 != 0o011:
                directory.chmod(stat.S_IMODE(mode) | 0o011)
        for parent in state_dir.resolve().parents:
            if parent.stat().st_mode & 0o001 == 0:
                raise PermanentError(
                    f"{parent} is closed to other users (mode {stat.S_IMODE(parent.stat().st_mode):o}), so containers "
                    f"cannot reach their root file systems under {state_dir}: use a state directory whose parents "
                    "others may search (as /var/lib), or chmod o+x the parent"
                )
        self._locks: dict[str, asyncio.Lock] = {}
        self._network_ready = False
        #: The container init (host pid) whose network this process attached, by environment: start need not
        #: wire again what create just wired. A new runner process starts empty and wires again (idempotent).
        self._attached: dict[str, int] = {}
        #: What each create in progress is doing, for ``progress``.
        self._creating: dict[str, str] = {}

    # The Runtime protocol.

    async def create(self, spec: ContainerSpec) -> ContainerStatus:
        environment_id = _checked(spec.environment_id)
        async with self._lock(environment_id):
            record = self._read_record(environment_id)
            if record is not None:
                return await self._status(record)
            if self._directory(environment_id).exists():
                # An incomplete create of a previous process; the workspace the runner filled for this create
                # stays.
                await self._tear_down(environment_id, keep_workspace=True)
            self._creating[environment_id] = f"getting the image {spec.image}"
            try:
                return await self._create(spec)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self._tear_down(environment_id, keep_workspace=True)
                raise
            finally:
                self._creating.pop(environment_id, None)

    async def image_labels(
        self, environment_id: str, image: str, *, credentials: Mapping[str, tuple[str, str]] | None = None
    ) -> Mapping[str, str]:
        environment_id = _checked(environment_id)
        self._creating[environment_id] = f"getting the image {image}"
        try:
            prepared = await self.images.prepare(
                image,
                holder=environment_id,
                progress=functools.partial(self._report_progress, environment_id),
                credentials=credentials,
            )
        finally:
            self._creating.pop(environment_id, None)
        return prepared.image.config.labels

    def _report_progress(self, environment_id: str, progress: Progress) -> None:
        if progress.step == "fetch":
            done, total = progress.fetched / 1e6, progress.total / 1e6
            line = f"pulling {progress.reference}: {done:.1f} of {total:.1f} MB"
        elif progress.step == "unpack":
            line = f"unpacking {progress.reference}: {progress.layers_done} of {progress.layers_total} layers"
        elif progress.step == "bootstrap":
            line = f"building {progress.reference} from Debian's mirror (the first time only; a minute or two)"
        else:
            line = f"getting the image {progress.reference} ({progress.step})"
        self._creating[environment_id] = line

    def workspace(self, environment_id: str) -> Path:
        directory = self._directory(_checked(environment_id))
        directory.mkdir(mode=0o711, exist_ok=True)
        workspace = directory / "workspace"
        workspace.mkdir(mode=0o755, exist_ok=True)
        return workspace

    def volume(self, environment_id: str, name: str) -> Path:
        if not _VOLUME_NAME.match(name):
            raise PermanentError(f"invalid volume name {name!r}")
        directory = self._directory(_checked(environment_id))
        directory.mkdir(mode=0o711, exist_ok=True)
        volume = directory / "volumes" / name
        if not volume.exists():
            root_id = self.images.id_range.host_id(0)
            volume.mkdir(mode=0o755, parents=True)
            os.chown(volume, root_id, root_id)
        return volume

    def progress(self, environment_id: str) -> str | None:
        """How far a create in progress has come (the image's pull and unpack, then the container), or None."""
        return self._creating.get(environment_id)

    async def start(self, environment_id: str) -> ContainerStatus:
        async with self._lock(environment_id):
            record = self._require_record(environment_id)
            if record.intent != "running":
                record = self._write_record(dataclasses.replace(record, intent="running"))
            return await self._start(record)

    async def stop(self, environment_id: str, *, timeout: float | None = None) -> ContainerStatus:
        async with self._lock(environment_id):
            record = self._require_record(environment_id)
            info = await self.runc.state(environment_id)
            if info is not None and info.status == "created" and record.started_at is None:
                return await self._status(record, info)  # never started: stays created, as the protocol says
            if record.intent != "stopped":
                record = self._write_record(dataclasses.replace(record, intent="stopped"))
            return await self._stop(record, info, self.stop_timeout if timeout is None else timeout)

    async def delete(self, environment_id: str, *, keep_workspace: bool = False) -> None:
        environment_id = _checked(environment_id)
        async with self._lock(environment_id):
            # The record goes first: from here on, whatever is left is an incomplete delete, and both the next
            # delete and repair finish it.
            with contextlib.suppress(FileNotFoundError):
                (self._directory(environment_id) / "record.json").unlink()
            # With keep_workspace, workspace.owner goes too: the container made next gives it to its own user.
            await self._tear_down(environment_id, keep_workspace=keep_workspace)

    async def exec(
        self,
        environment_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        process = await self.open_exec(environment_id, ExecRequest(argv=argv, env=dict(env or {})))
        process.stdin.close()
        try:
            async with asyncio.timeout(timeout):
                assert process.stderr is not None
                stdout, stderr, exit_code = await asyncio.gather(
                    process.stdout.read(), process.stderr.read(), process.wait()
                )
        except TimeoutError:
            await process.signal(signal.SIGKILL)
            await process.wait()
            raise TemporaryError(f"{argv[0]!r} in {environment_id} did not finish within {timeout} s") from None
        return ExecResult(exit_code=exit_code, stdout=stdout, stderr=stderr)

    async def open_exec(self, environment_id: str, request: ExecRequest) -> HostProcess:
        if not request.argv:
            raise PermanentError("exec needs a program to run")
        spec = self._require_record(environment_id).spec
        info = await self.runc.state(environment_id)
        if info is None or info.status != "running":
            state = info.status if info is not None else "stopped"
            raise ContainerNotRunning(f"the container of {environment_id} is {state}, not running")
        user: tuple[int, int] | None = None
        additional_gids: tuple[int, ...] = ()
        wanted_user = request.user or spec.remote_user
        if wanted_user is not None:
            user, additional_gids = _resolve_user(self._rootfs(environment_id), wanted_user)
        env = {**spec.remote_env, **request.env}
        if request.tty:
            env = {"TERM": "xterm", **env}
        argv = self.runc.exec_argv(
            environment_id,
            request.argv,
            env=env,
            cwd=request.cwd or spec.workdir,
            user=user,
            additional_gids=additional_gids,
            tty=request.tty,
        )
        # runc is the host process: its exit status is the one inside (128 + N for signal N), signals sent to it
        # reach the process inside, and with a TTY it proxies its own terminal (raw: the container's does the
        # echo and line editing) to the container's, copying the size on the SIGWINCH that a resize sends it.
        return await start_host_process(argv, tty=request.tty, size=request.size or (24, 80), raw=True)

    async def container_entry(self, environment_id: str) -> tuple[int, str]:
        """The host pid of the running container's PID 1 and the user sessions run as (the remote user, else
        PID 1's), for acting inside it from outside; ``ContainerNotRunning`` when it does not run."""
        info = await self.runc.state(environment_id) if _ENVIRONMENT_ID.match(environment_id) else None
        record = self._read_record(environment_id) if info is not None else None
        if info is None or info.status != "running" or info.pid <= 0 or record is None:
            raise ContainerNotRunning(f"environment {environment_id} is not running")
        return info.pid, record.spec.remote_user or record.spec.user or ""

    async def connect(self, environment_id: str, host: str, port: int) -> socket.socket:
        pid, _ = await self.container_entry(environment_id)
        return await asyncio.to_thread(_connect_inside, pid, host, port)

    async def listening_ports(self, environment_id: str) -> builtins.list[ListeningPort]:
        try:
            pid, _ = await self.container_entry(environment_id)
            return await port_detection.listening_ports_of(pid)
        except (ContainerNotRunning, OSError):
            return []

    async def inspect(self, environment_id: str) -> ContainerStatus | None:
        if not _ENVIRONMENT_ID.match(environment_id):
            return None
        record = self._read_record(environment_id)
        if record is None:
            return None
        return await self._status(record)

    async def list(self) -> builtins.list[ContainerStatus]:
        containers = {info.id: info for info in await self.runc.list()}
        statuses: builtins.list[ContainerStatus] = []
        for environment_id in self._environment_ids():
            record = self._read_record(environment_id)
            if record is not None:
                statuses.append(self._status_of(record, containers.get(environment_id)))
        return statuses

    async def close(self) -> None:
        """Nothing is held open between calls; containers keep running."""

    # Crash recovery.

    async def repair(self) -> builtins.list[str]:
        """Bring every environment to a state a step left it in on purpose, and remove what no record explains;
        return what was done, one line each. Called when the runner starts, and by the doctor."""
        self._attached.clear()  # the network's repair may undo or re-make what this process attached
        fixed: builtins.list[str] = []
        containers = {info.id: info for info in await self.runc.list()}
        for environment_id in self._environment_ids():
            async with self._lock(environment_id):
                fixed += await self._repair_one(environment_id, containers.get(environment_id))
        known = set(self._environment_ids())
        for environment_id, info in containers.items():
            if environment_id not in known:
                await self.runc.delete(environment_id, force=True)
                fixed.append(f"{environment_id}: deleted runc container ({info.status}) that had no environment")
        for environment_id in self.runc.incomplete():
            if environment_id not in known and self._discard_incomplete_container(environment_id):
                fixed.append(f"{environment_id}: removed a runc container that was never completely made")
        for environment_id, directories in cgroups.leftover_cgroups(self.cgroup_parent).items():
            if environment_id in known and environment_id in containers:
                continue
            if environment_id in known:
                live = await self.runc.state(environment_id)
                if live is not None:
                    continue
            for directory in directories:
                cgroups.kill_cgroup(directory)
            if cgroups.remove_cgroup(directories):
                fixed.append(f"{environment_id}: removed leftover cgroups")
        if self.network is not None:
            wanted = {i for i in self._environment_ids() if self._read_record(i) is not None}
            fixed += await self.network.repair(wanted=wanted)
        return fixed

    async def orphans(self) -> builtins.list[str]:
        """What the host has under devyard's names that no record explains (mounts under the state directory,
        runc containers, cgroups, environment directories, network attachments) and steps a killed runner left
        half-done (what ``repair`` would finish); empty on a healthy host."""
        found: builtins.list[str] = []
        containers = {info.id: info for info in await self.runc.list()}
        records = {i: r for i in self._environment_ids() if (r := self._read_record(i)) is not None}
        for environment_id in self._environment_ids():
            if environment_id not in records:
                found.append(f"environment directory without a record: {self._directory(environment_id)}")
        for mount_point in _mounts_under(self._environments):
            environment_id = mount_point.relative_to(self._environments).parts[0]
            info = containers.get(environment_id)
            if environment_id not in records or info is None or info.status not in ("created", *_LIVE):
                found.append(f"mount without a container: {mount_point}")
        for environment_id, info in containers.items():
            if environment_id not in records:
                found.append(f"runc container without an environment: {environment_id} ({info.status})")
        found += [f"runc container never completely made: {i}" for i in self.runc.incomplete()]
        for environment_id, record in records.items():
            step = _unfinished_step(record, containers.get(environment_id), self._mounted(environment_id))
            if step is not None:
                found.append(f"{step}: {environment_id}")
        for environment_id, directories in cgroups.leftover_cgroups(self.cgroup_parent).items():
            info = containers.get(environment_id)
            if environment_id not in records or info is None or info.status == "stopped":
                found += [f"cgroup without a container: {directory}" for directory in directories]
        if self.network is not None:
            found += await self.network.orphans(wanted=set(records))
        return found

    async def _repair_one(self, environment_id: str, info: ContainerInfo | None) -> builtins.list[str]:
        # Keep the conditions in step with _unfinished_step, which reports what this would do.
        try:
            record = self._read_record(environment_id)
        except PermanentError as exc:
            return [f"{environment_id}: left alone: {exc}"]
        if record is None:
            await self._tear_down(environment_id)
            return [f"{environment_id}: removed an incomplete create or delete"]
        fixed: builtins.list[str] = []
        if record.intent == "stopped" and (info is not None or self._mounted(environment_id)):
            await self._stop(record, info, self.stop_timeout)
            fixed.append(f"{environment_id}: finished an interrupted stop")
        elif record.intent == "running" and (info is None or info.status != "running"):
            if info is not None and info.status == "stopped" and record.started_at is not None:
                # It ran and exited by itself (or was killed from outside): release its mount, keep it stopped;
                # starting it again is the reconciler's call.
                await self._release(environment_id, info)
                self._write_record(dataclasses.replace(record, intent="stopped", finished_at=_now()))
                fixed.append(f"{environment_id}: container had exited; released it")
            else:
                await self._start(record)
                fixed.append(f"{environment_id}: finished an interrupted start")
        elif record.intent == "created" and (info is None or info.status == "stopped"):
            await self._release(environment_id, info)
            await self._make_container(record)
            fixed.append(f"{environment_id}: re-made its container")
        return fixed

    # Steps.

    async def _create(self, spec: ContainerSpec) -> ContainerStatus:
        environment_id = spec.environment_id

        prepared = await self.images.prepare(
            spec.image,
            holder=environment_id,
            progress=functools.partial(self._report_progress, environment_id),
            credentials=spec.registry_credentials,
        )
        self._creating[environment_id] = "creating the container"
        started = time.monotonic()
        directory = self._directory(environment_id)
        directory.mkdir(mode=0o711, exist_ok=True)
        root_id = self.images.id_range.host_id(0)
        for name in ("upper", "work", "rootfs"):
            (directory / name).mkdir(mode=0o755, exist_ok=True)
        # The overlay's root directory takes the upper directory's owner: root inside must own "/".
        os.chown(directory / "upper", root_id, root_id)
        record = _Record(
            spec=spec,
            image_digest=prepared.image.digest,
            layers=tuple(str(layer) for layer in prepared.image.layers),
            image_config=prepared.image.config,
            created_at=_now(),
        )
        await self._make_container(record)
        timings = {**{k: float(v) for k, v in prepared.timings.items()}, "create": time.monotonic() - started}
        record = self._write_record(dataclasses.replace(record, timings=timings))
        return await self._status(record)

    async def _make_container(self, record: _Record) -> None:
        """Mount the root, write the bundle, ``runc create``, and attach the network; each part idempotent."""
        environment_id = record.spec.environment_id
        directory = self._directory(environment_id)
        rootfs = self._rootfs(environment_id)
        if not self._mounted(environment_id):
            await _mount_overlay(record.layers, directory / "upper", directory / "work", rootfs)
        hostname = oci_config.hostname_for(record.spec.labels, environment_id)
        # Without a network these stay; with one, _attach_network rewrites them in place (they are bound by inode).
        resolv_conf = "# no network: this environment has loopback only\n"
        hosts = f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
        write_atomically(directory / "resolv.conf", resolv_conf.encode(), mode=0o644)
        write_atomically(directory / "hosts", hosts.encode(), mode=0o644)
        config = record.image_config
        spec = record.spec
        args = KEEP_ALIVE if spec.override_command else init_process(config)
        if args == KEEP_ALIVE and not _exists_in_root(rootfs, "/bin/sh"):
            raise PermanentError(f"image {spec.image} has no command and no /bin/sh to keep its environment up with")
        uid, gid = 0, 0
        additional_gids: tuple[int, ...] = ()
        user = spec.user or config.user
        if user:
            (uid, gid), additional_gids = _resolve_user(rootfs, user)
        env = _merge_env(config.env, spec.env, hostname)
        binds, tmpfs = self._mounts(record)
        if any(mount.kind is MountKind.WORKSPACE for mount in spec.mounts):
            owner = spec.workspace_owner or spec.remote_user or user or "0"
            self._give_workspace(environment_id, _resolve_user(rootfs, owner)[0])
        try:
            capabilities = oci_config.capability_set(spec.capabilities, privileged=spec.privileged)
        except ValueError as exc:
            raise PermanentError(str(exc)) from exc
        document = oci_config.container_config(
            rootfs=rootfs,
            process=oci_config.ContainerProcess(
                args=args, env=env, cwd=config.working_dir or "/", uid=uid, gid=gid, additional_gids=additional_gids
            ),
            hostname=hostname,
            id_range=self.images.id_range,
            # Always a new namespace, owned by the container's user namespace: runc 1.1's exec enters the user
            # namespace first and then may not enter a network namespace the host's user namespace owns.
            netns_path=None,
            cgroups_path=cgroups.cgroups_path(self.cgroup_parent, environment_id),
            resources=cgroups.resources(cpu=spec.cpu, memory_mib=spec.memory_mib, pids_limit=self.pids_limit),
            seccomp=seccomp.seccomp_profile(),
            binds=[
                oci_config.BindMount(directory / "resolv.conf", "/etc/resolv.conf"),
                oci_config.BindMount(directory / "hosts", "/etc/hosts"),
                *binds,
                *self.binds,
            ],
            tmpfs=tmpfs,
            capabilities=capabilities,
            annotations={"devyard.io/environment": environment_id},
        )
        write_atomically(directory / "config.json", json.dumps(document, indent=1).encode(), mode=0o600)
        info = await self.runc.state(environment_id)
        if info is not None and info.status == "stopped":
            await self.runc.delete(environment_id, force=True)
            info = None
        if info is None:
            self._discard_incomplete_container(environment_id)
            await self.runc.create(
                environment_id, directory, pid_file=directory / "pid", console_log=directory / "console.log"
            )
            info = await self.runc.state(environment_id)
        if info is not None and info.pid > 0:
            await self._attach_network(environment_id, hostname, info.pid)

    def _mounts(self, record: _Record) -> tuple[builtins.list[oci_config.BindMount], builtins.list[str]]:
        """The binds (workspace, volumes) and tmpfs targets of the spec's mounts; the directories made as needed,
        owned by root inside."""
        directory = self._directory(record.spec.environment_id)
        root_id = self.images.id_range.host_id(0)
        binds: builtins.list[oci_config.BindMount] = []
        tmpfs: builtins.list[str] = []
        for mount in record.spec.mounts:
            if mount.kind is MountKind.TMPFS:
                tmpfs.append(mount.target)
                continue
            if mount.kind is MountKind.WORKSPACE:
                source = directory / "workspace"
            else:
                source = self.volume(record.spec.environment_id, mount.source)
            if not source.exists():
                source.mkdir(mode=0o755, parents=True)
                os.chown(source, root_id, root_id)
            binds.append(oci_config.BindMount(source, mount.target, read_only=mount.read_only))
        return binds, tmpfs

    def _give_workspace(self, environment_id: str, owner: tuple[int, int]) -> None:
        """Give the workspace's files (made by the runner as root) to the user inside, once: a user who later
        gives a file to someone else keeps it that way."""
        directory = self._directory(environment_id)
        uid, gid = (self.images.id_range.host_id(owner[0]), self.images.id_range.host_id(owner[1]))
        marker = directory / "workspace.owner"
        if marker.exists():
            return
        workspace = directory / "workspace"
        if workspace.is_dir():
            os.lchown(workspace, uid, gid)
            for parent, directories, files in os.walk(workspace):
                for name in (*directories, *files):
                    os.lchown(os.path.join(parent, name), uid, gid)
        write_atomically(marker, f"{uid}:{gid}\n".encode(), mode=0o644)

    async def _attach_network(self, environment_id: str, hostname: str, pid: int) -> None:
        """Hand the network the container's own namespace and wire it; idempotent.

        The network keeps a namespace mounted at ``<netns_dir>/<id>`` and keeps one it finds there, so the
        container's namespace is bind-mounted there before ``attach``. One of an earlier container of the
        environment (before a stop, a crash) is detached first: the address may change across a restart.
        """
        if self.network is None or self._attached.get(environment_id) == pid:
            return
        if not self._network_ready:
            await self.network.setup()
            self._network_ready = True
        netns = self.network.netns_dir / environment_id
        namespace = os.stat(f"/proc/{pid}/ns/net")
        with contextlib.suppress(FileNotFoundError):
            current = os.stat(netns)
            if (current.st_dev, current.st_ino) != (namespace.st_dev, namespace.st_ino):
                await self.network.detach(environment_id)
        if not _is_mount_point(netns):
            netns.parent.mkdir(parents=True, exist_ok=True)
            netns.touch()
            code, output = await _command("mount", "--bind", f"/proc/{pid}/ns/net", str(netns))
            if code != 0:
                raise TemporaryError(f"binding the network namespace of {environment_id} failed: {output}")
        attachment = await self.network.attach(environment_id, hostname=hostname)
        directory = self._directory(environment_id)
        _write_in_place(directory / "resolv.conf", attachment.resolv_conf.encode())
        _write_in_place(directory / "hosts", attachment.hosts.encode())
        self._attached[environment_id] = pid

    async def _start(self, record: _Record) -> ContainerStatus:
        environment_id = record.spec.environment_id
        info = await self.runc.state(environment_id)
        if info is not None and info.status in _LIVE:
            if record.started_at is None or record.finished_at is not None:
                record = self._write_record(dataclasses.replace(record, started_at=_now(), finished_at=None))
            return self._status_of(record, info)
        began = time.monotonic()
        timings = dict(record.timings)
        if info is None or info.status == "stopped":
            await self._make_container(record)
            timings["create"] = time.monotonic() - began
            began = time.monotonic()
        else:  # created: by create, or by a start a crash interrupted before it attached the network
            hostname = oci_config.hostname_for(record.spec.labels, environment_id)
            await self._attach_network(environment_id, hostname, info.pid)
        await self.runc.start(environment_id)
        timings["start"] = time.monotonic() - began
        record = self._write_record(
            dataclasses.replace(record, started_at=_now(), finished_at=None, exit_code=None, timings=timings)
        )
        return await self._status(record)

    async def _stop(self, record: _Record, info: ContainerInfo | None, timeout: float) -> ContainerStatus:
        environment_id = record.spec.environment_id
        exit_code = record.exit_code
        finished_at = record.finished_at
        if info is not None and info.status in _LIVE and info.pid > 0:
            stop_signal = _stop_signal(record.image_config)
            if await _signal_and_wait(self.runc, environment_id, info.pid, stop_signal, timeout):
                exit_code = 0
            else:
                await _signal_and_wait(self.runc, environment_id, info.pid, signal.SIGKILL, _KILL_WAIT_SECONDS)
                exit_code = _KILLED_EXIT_CODE
            finished_at = _now()
        elif info is not None and info.status == "stopped" and finished_at is None:
            finished_at = _now()
        await self._release(environment_id, info)
        record = self._write_record(dataclasses.replace(record, finished_at=finished_at, exit_code=exit_code))
        return self._status_of(record, None)

    async def _release(self, environment_id: str, info: ContainerInfo | None) -> None:
        """Delete the runc container, detach its network and unmount the root; the disk stays."""
        self._attached.pop(environment_id, None)
        if info is not None:
            await self.runc.delete(environment_id, force=True)
        if self.network is not None:
            await self.network.detach(environment_id)
        await _unmount_all(self._directory(environment_id))

    def _discard_incomplete_container(self, environment_id: str) -> bool:
        """Kill and remove what a runc create killed half-way left (its init, its cgroups, its state)."""
        directories = cgroups.environment_cgroups(self.cgroup_parent, environment_id)
        for group in directories:
            cgroups.kill_cgroup(group)
        removed = bool(cgroups.remove_cgroup(directories))
        return self.runc.discard_incomplete(environment_id) or removed

    async def _tear_down(self, environment_id: str, *, keep_workspace: bool = False) -> None:
        """Remove everything of an environment that has no record (any more); idempotent. ``keep_workspace``:
        except its workspace and volumes (for the create that follows: the runner filled them before, and a
        rebuild keeps them, as Docker keeps named volumes)."""
        self._attached.pop(environment_id, None)
        await self.runc.delete(environment_id, force=True)
        self._discard_incomplete_container(environment_id)
        directory = self._directory(environment_id)
        await _unmount_all(directory)
        if self.network is not None:
            await self.network.detach(environment_id)
        if _mounts_under(directory):
            raise TemporaryError(f"{directory} still has mounts; not removing it")
        if keep_workspace and (directory / "workspace").is_dir():
            for entry in directory.iterdir():
                if entry.name not in ("workspace", "volumes"):
                    await asyncio.to_thread(_remove, entry)
        elif directory.exists():
            await asyncio.to_thread(shutil.rmtree, directory)
        await self.images.release(environment_id)

    # Records and state.

    def _directory(self, environment_id: str) -> Path:
        return self._environments / environment_id

    def _rootfs(self, environment_id: str) -> Path:
        return self._directory(environment_id) / "rootfs"

    def _mounted(self, environment_id: str) -> bool:
        return self._rootfs(environment_id) in _mounts_under(self._directory(environment_id))

    def _lock(self, environment_id: str) -> asyncio.Lock:
        return self._locks.setdefault(environment_id, asyncio.Lock())

    def _environment_ids(self) -> builtins.list[str]:
        if not self._environments.is_dir():
            return []
        return sorted(p.name for p in self._environments.iterdir() if p.is_dir() and _ENVIRONMENT_ID.match(p.name))

    def _require_record(self, environment_id: str) -> _Record:
        if not _ENVIRONMENT_ID.match(environment_id):
            raise ContainerNotFound(f"no container for {environment_id!r}")
        record = self._read_record(environment_id)
        if record is None:
            raise ContainerNotFound(f"no container for {environment_id}")
        return record

    def _read_record(self, environment_id: str) -> _Record | None:
        path = self._directory(environment_id) / "record.json"
        try:
            document = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise PermanentError(f"cannot read {path}: {exc}") from exc
        try:
            return _decode(document)
        except (KeyError, TypeError, ValueError) as exc:
            raise PermanentError(f"{path} is not a record this runner understands: {exc}") from exc

    def _write_record(self, record: _Record) -> _Record:
        path = self._directory(record.spec.environment_id) / "record.json"
        write_atomically(path, json.dumps(_encode(record), indent=1).encode(), mode=0o600)
        return record

    async def _status(self, record: _Record, info: ContainerInfo | None = None) -> ContainerStatus:
        if info is None:
            info = await self.runc.state(record.spec.environment_id)
        return self._status_of(record, info)

    @staticmethod
    def _status_of(record: _Record, info: ContainerInfo | None) -> ContainerStatus:
        if info is not None and info.status in _LIVE:
            state = ContainerState.RUNNING
        elif info is not None and info.status in ("created", "creating"):
            state = ContainerState.CREATED
        elif info is None and record.started_at is None:
            state = ContainerState.CREATED  # its runc container is re-made by start
        else:
            state = ContainerState.STOPPED
        return ContainerStatus(
            environment_id=record.spec.environment_id,
            state=state,
            spec=record.spec,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at if state is ContainerState.STOPPED else None,
            exit_code=record.exit_code if state is ContainerState.STOPPED else None,
            timings=dict(record.timings),
        )


def _unfinished_step(record: _Record, info: ContainerInfo | None, mounted: bool) -> str | None:
    """What ``repair`` would finish for an environment with a record (``_repair_one``'s conditions), or None."""
    if record.intent == "stopped" and (info is not None or mounted):
        return "interrupted stop"
    if record.intent == "running" and (info is None or info.status != "running"):
        if info is not None and info.status == "stopped" and record.started_at is not None:
            return "container exited by itself, not yet released"
        return "interrupted start"
    if record.intent == "created" and (info is None or info.status == "stopped"):
        return "container missing after its create"
    return None


# Host operations.


async def _command(*argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace").strip()


async def _mount_overlay(layers: Sequence[str], upper: Path, work: Path, target: Path) -> None:
    if not layers:
        raise PermanentError("an image without layers cannot be mounted")
    for path in (*layers, str(upper), str(work)):
        if any(character in path for character in ":,\\"):
            raise PermanentError(f"overlayfs cannot take the path {path!r}")
    options = f"lowerdir={':'.join(reversed(layers))},upperdir={upper},workdir={work}"
    code, output = await _command("mount", "-t", "overlay", "overlay", "-o", options, str(target))
    if code != 0:
        raise TemporaryError(f"mounting the overlay at {target} failed: {output}")


async def _unmount_all(directory: Path) -> None:
    """Unmount every mount at or under ``directory``, deepest first; lazily if one is busy."""
    for mount_point in sorted(_mounts_under(directory), key=lambda p: -len(p.parts)):
        code, output = await _command("umount", str(mount_point))
        if code != 0 and mount_point in _mounts_under(directory):
            code, output = await _command("umount", "--lazy", str(mount_point))
            if code != 0:
                raise TemporaryError(f"unmounting {mount_point} failed: {output}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _is_mount_point(path: Path) -> bool:
    return path in _mounts_under(path)


def _write_in_place(path: Path, data: bytes) -> None:
    """Replace a file's contents keeping its inode: a bind mount of it shows the new contents."""
    descriptor = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _mounts_under(directory: Path) -> list[Path]:
    """Mount points at or under ``directory``, from this process's mountinfo."""
    found: list[Path] = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            mount_point = Path(_unescape(line.split(" ", 5)[4]))
            if mount_point == directory or directory in mount_point.parents:
                found.append(mount_point)
    return found


def _unescape(field_text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field_text)


async def _signal_and_wait(runc: Runc, environment_id: str, pid: int, number: int, timeout: float) -> bool:
    """Send ``number`` to the container's PID 1 and wait up to ``timeout`` seconds for it to exit."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        with contextlib.suppress(TemporaryError):  # it may have exited meanwhile; the pidfd says
            await runc.kill(environment_id, number)
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            async with asyncio.timeout(timeout):
                await exited
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


def _stop_signal(config: ImageConfig) -> int:
    if init_process(config) == KEEP_ALIVE or not config.stop_signal:
        return signal.SIGTERM
    name = config.stop_signal.upper()
    if name.isdigit():
        return int(name)
    try:
        return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    except KeyError:
        return signal.SIGTERM


# The container's files, read from outside without following its symlinks out of its root.


def _open_in_root(root: Path, path: str) -> int:
    """Open ``path`` inside ``root`` for reading as the container would see it: symlinks resolve against
    ``root`` (an absolute one starts over at ``root``, ``..`` stops at it), and no step leaves it."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stack = [root_fd]
    parts = [part for part in path.split("/") if part]
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            current = stack[-1]
            info = os.stat(name, dir_fd=current, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                links += 1
                if links > 40:
                    raise OSError(errno.ELOOP, f"too many symlinks resolving {path}")
                target = os.readlink(name, dir_fd=current)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts = [part for part in target.split("/") if part] + parts
                continue
            if parts:
                stack.append(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current))
            else:
                # O_NOFOLLOW: if it became a symlink since the stat, fail rather than follow it.
                return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=current)
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=stack[-1])
    finally:
        for descriptor in stack:
            os.close(descriptor)


def _read_in_root(root: Path, path: str, limit: int = 4 * 1024 * 1024) -> str | None:
    try:
        descriptor = _open_in_root(root, path)
    except OSError:
        return None
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return None
        return file.read(limit).decode(errors="replace")


def _exists_in_root(root: Path, path: str) -> bool:
    try:
        os.close(_open_in_root(root, path))
    except OSError:
        return False
    return True


def _resolve_user(rootfs: Path, user: str) -> tuple[tuple[int, int], tuple[int, ...]]:
    """``user``, ``uid``, ``user:group`` or ``uid:gid`` as ids inside the container, from its /etc/passwd and
    /etc/group; with the user's supplementary groups when the group was not given."""
    name, _, group = user.partition(":")
    passwd = _read_in_root(rootfs, "/etc/passwd") or ""
    groups = _read_in_root(rootfs, "/etc/group") or ""
    uid: int | None = None
    gid: int | None = None
    user_name: str | None = None
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or not fields[2].isdigit() or not fields[3].isdigit():
            continue
        if fields[0] == name or (name.isdigit() and int(fields[2]) == int(name)):
            uid, gid, user_name = int(fields[2]), int(fields[3]), fields[0]
            break
    if uid is None:
        if not name.isdigit():
            raise PermanentError(f"no user {name!r} in the container's /etc/passwd")
        uid, gid = int(name), 0
    additional: list[int] = []
    if group:
        gid = None
        for line in groups.splitlines():
            fields = line.split(":")
            if len(fields) >= 3 and fields[2].isdigit() and (fields[0] == group or fields[2] == group):
                gid = int(fields[2])
                break
        if gid is None:
            if not group.isdigit():
                raise PermanentError(f"no group {group!r} in the container's /etc/group")
            gid = int(group)
    elif user_name is not None:
        for line in groups.splitlines():
            fields = line.split(":")
            if len(fields) >= 4 and fields[2].isdigit() and user_name in fields[3].split(","):
                additional.append(int(fields[2]))
    assert gid is not None
    return (uid, gid), tuple(sorted(set(additional) - {gid}))


def _merge_env(image_env: Sequence[str], spec_env: Mapping[str, str], hostname: str) -> list[str]:
    values: dict[str, str] = {}
    for item in image_env:
        key, _, value = item.partition("=")
        values[key] = value
    values.setdefault("PATH", _DEFAULT_PATH.partition("=")[2])
    values.setdefault("HOSTNAME", hostname)
    values.update(spec_env)
    return [f"{key}={value}" for key, value in values.items()]


# Records.


def _now() -> datetime:
    return datetime.now(UTC)


def _checked(environment_id: str) -> str:
    if not _ENVIRONMENT_ID.match(environment_id):
        raise PermanentError(f"{environment_id!r} cannot name a container (letters, digits, '_', '.', '-')")
    return environment_id


def _encode(record: _Record) -> dict[str, Any]:
    spec = record.spec
    config = record.image_config

    def timestamp(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "version": _FORMAT_VERSION,
        # to_json: everything but the registry credentials, which never touch the disk.
        "spec": spec.to_json(),
        "image_digest": record.image_digest,
        "layers": list(record.layers),
        "image_config": {**dataclasses.asdict(config), "labels": dict(config.labels)},
        "created_at": record.created_at.isoformat(),
        "intent": record.intent,
        "started_at": timestamp(record.started_at),
        "finished_at": timestamp(record.finished_at),
        "exit_code": record.exit_code,
        "timings": dict(record.timings),
    }


def _decode(document: dict[str, Any]) -> _Record:
    if document.get("version") != _FORMAT_VERSION:
        raise ValueError(f"unknown format version {document.get('version')!r}")

    def timestamp(value: str | None) -> datetime | None:
        return datetime.fromisoformat(value) if value else None

    config = document["image_config"]
    image_config = ImageConfig(
        **{
            **config,
            **{key: tuple(config[key]) for key in ("entrypoint", "cmd", "env")},
        }
    )
    created_at = timestamp(document["created_at"])
    if created_at is None or document["intent"] not in ("created", "running", "stopped"):
        raise ValueError("no created_at, or an unknown intent")
    return _Record(
        spec=ContainerSpec.from_json(document["spec"]),
        image_digest=document["image_digest"],
        layers=tuple(document["layers"]),
        image_config=image_config,
        created_at=created_at,
        intent=document["intent"],
        started_at=timestamp(document["started_at"]),
        finished_at=timestamp(document["finished_at"]),
        exit_code=document["exit_code"],
        timings=dict(document["timings"]),
    )


def _connect_inside(pid: int, host: str, port: int) -> socket.socket:
    """A socket connected to ``host:port`` from the network namespace of ``pid``, non-blocking. Runs in a thread of
    its own (``setns`` moves the calling thread only), which goes back to the host's namespace before it returns;
    the socket stays in the namespace it was made in."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        inside = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        os.close(own)
        raise ContainerNotRunning(f"process {pid} of the container is gone") from None
    try:
        container_files.setns(inside, container_files.CLONE_NEWNET)
        try:
            # Names resolve here against the host's files: only addresses and "localhost" are meant.
            target = "127.0.0.1" if host in ("localhost", "") else host
            family = socket.AF_INET6 if ":" in target else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(10)
                sock.connect((target, port))
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock
        finally:
            container_files.setns(own, container_files.CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(inside)
