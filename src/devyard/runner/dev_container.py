"""From an environment's spec to what its container is made of: content, dev container, image, hooks.

The environment reconciler calls ``DevContainers.prepare`` when an environment has no container yet. It:

1. fetches the content (``content.fetch_content``) into the runtime's workspace of the environment, on the host;
2. finds and resolves the repository's devcontainer.json (``devyard.devcontainer``), or, without one, uses the
   spec's image, the organization's default or the runner's;
3. gets the image (pulled, or built with its Features) and merges its ``devcontainer.metadata`` label, the
   Features' metadata and devcontainer.json as the Dev Containers spec says;
4. returns the ``ContainerSpec`` and keeps the ``LifecyclePlan`` (the hooks) and the automations file's location
   in ``<state_dir>/dev-containers/<id>/``, for the starts that follow (a runner restart included).

``remove`` forgets an environment's files (when it is deleted). Logs of the steps go to
``<log_root>/<id>/build.log``; the ``LogShipper`` ships them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final

from devyard.devcontainer import config as dev_container_config
from devyard.devcontainer import image_metadata, substitution
from devyard.devcontainer.config import ConfigNotFound, DevContainerConfig
from devyard.devcontainer.config import Mount as DevContainerMount
from devyard.devcontainer.errors import ConfigError
from devyard.devcontainer.features import ResolvedFeature, metadata_entry, resolve_features, write_build_context
from devyard.devcontainer.image_metadata import MergedConfig
from devyard.runner import dotfiles, lifecycle, port_detection
from devyard.runner.atomic_file import write_atomically
from devyard.runner.automations.file_format import Automations, find_automations_file, load_automations
from devyard.runner.content import fetch_content, git_credentials
from devyard.runner.dotfiles import fetch_dotfiles
from devyard.runner.errors import PermanentError, RunnerError
from devyard.runner.features import FeatureCache, features_root
from devyard.runner.images import builder
from devyard.runner.images.builder import BuildSpec
from devyard.runner.runtime import ContainerSpec, Mount, MountKind, Runtime
from devyard.wire.environments import ContentSpec, Environment, GitContent
from devyard.wire.secrets import SecretValue

if TYPE_CHECKING:
    from devyard.runner.images.store import ImageStore
    from devyard.runner.linux.network import Network

__all__ = ["DevContainers", "Prepared", "workspace_name"]

log = logging.getLogger(__name__)

#: Where a workspace is mounted when devcontainer.json does not say (the spec's default).
_WORKSPACES: Final = PurePosixPath("/workspaces")
#: Builds (Dockerfiles, Features) the image store keeps beyond those environments hold.
_KEPT_BUILDS: Final = 32
#: The named build context that holds the Features' files when their stages follow a Dockerfile's own.
_FEATURES_CONTEXT: Final = "devyard_features"
#: The volume that holds the user's dotfiles repository as fetched.
_DOTFILES_VOLUME: Final = "dotfiles"


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` made of an environment."""

    spec: ContainerSpec
    plan: lifecycle.LifecyclePlan
    #: The automations file inside the workspace, relative to it, if there is one.
    automations_file: str | None = None
    #: The ``spec.rebuild_request`` this container is made for.
    rebuild_request: str | None = None
    #: Seconds per step: ``content``, ``build``.
    timings: Mapping[str, float] = field(default_factory=dict)


class DevContainers:
    def __init__(
        self,
        runtime: Runtime,
        *,
        state_dir: Path,
        log_root: Path,
        desktop: bool = False,
        images: ImageStore | None = None,
        network: Network | None = None,
    ) -> None:
        self.runtime = runtime
        self.state_dir = state_dir
        self.log_root = log_root
        self.desktop = desktop
        #: The runtime's image store, where builds go; None: this runner cannot build (the fake runtime).
        self.images = images
        #: Where builds' RUN steps get a network from (as an environment's, with its rules); None: no network.
        self.network = network
        #: Seconds the last resolve of each environment spent getting its image, until ``prepare`` reports it.
        self._pulled: dict[str, float] = {}
        #: Tasks that outlive the call that started them (pruning the build cache).
        self._background: set[asyncio.Task[None]] = set()

    def directory(self, environment_id: str) -> Path:
        """The runner's own files of the environment (never visible inside it)."""
        return self.state_dir / environment_id

    def logs(self, environment_id: str) -> Path:
        return self.log_root / environment_id

    async def prepare(self, environment: Environment, base: ContainerSpec, secrets: list[SecretValue]) -> Prepared:
        """Fetch the content and resolve the dev container for ``environment``; ``base`` is the container spec
        the reconciler made from the environment's spec alone (image, env, limits, labels, credentials).
        A refused devcontainer.json is a ``PermanentError`` whose message is the file, line, column and what is
        wrong."""
        key = environment.metadata.id
        timings: dict[str, float] = {}
        content = environment.spec.content
        if content is None:
            bare = Prepared(spec=base, plan=lifecycle.LifecyclePlan(), rebuild_request=environment.spec.rebuild_request)
            self._keep(key, bare)
            return bare
        workspace = self.runtime.workspace(key)
        fetched = await fetch_content(content, workspace, credentials=git_credentials(secrets), desktop=self.desktop)
        timings["content"] = round(fetched.seconds, 3)
        name = workspace_name(content)
        build_log = _BuildLog(self.logs(key) / "build.log")
        try:
            config = self._config(environment, workspace, name)
            if config is None:
                folder = str(_WORKSPACES / name)
                build_log.line(f"no devcontainer.json: the image {base.image}")
                self.directory(key).mkdir(parents=True, exist_ok=True)
                port_detection.keep_declared(self.directory(key), forward_ports=(), app_ports=(), ports_attributes={})
                spec = dataclasses.replace(base, mounts=(Mount(MountKind.WORKSPACE, folder),), workdir=folder)
                plan = lifecycle.LifecyclePlan(cwd=folder)
            else:
                started = time.monotonic()
                spec, plan = await self._resolve(environment, base, config, build_log)
                timings["pull"] = self._pulled.pop(key, 0.0)
                timings["build"] = round(time.monotonic() - started - timings["pull"], 3)
        except ConfigError as exc:
            build_log.line(f"error: {exc}")
            raise PermanentError(str(exc)) from exc
        except RunnerError as exc:
            build_log.line(f"error: {exc}")
            raise
        if environment.spec.dotfiles is not None:
            spec, plan = await self._with_dotfiles(key, environment.spec.dotfiles, secrets, spec, plan, build_log)
        prepared = Prepared(
            spec=spec,
            plan=plan,
            automations_file=environment.spec.automations_path,
            rebuild_request=environment.spec.rebuild_request,
            timings=timings,
        )
        self._keep(key, prepared)
        return prepared

    async def _with_dotfiles(
        self,
        key: str,
        repository: GitContent,
        secrets: list[SecretValue],
        spec: ContainerSpec,
        plan: lifecycle.LifecyclePlan,
        build_log: _BuildLog,
    ) -> tuple[ContainerSpec, lifecycle.LifecyclePlan]:
        """The user's dotfiles fetched into a volume the container sees read-only, and their install added after
        ``postCreateCommand``. Dotfiles that cannot be fetched are reported and left out: the environment is
        worth more than the prompt."""
        started = time.monotonic()
        try:
            fetched = await fetch_dotfiles(
                repository,
                self.runtime.volume(key, _DOTFILES_VOLUME),
                credentials=git_credentials(secrets),
                desktop=self.desktop,
            )
        except RunnerError as exc:
            build_log.line(f"dotfiles: {exc}; the environment goes on without them")
            return spec, plan
        what = "the install script" if fetched.install else f"{len(fetched.links)} links"
        build_log.line(
            f"dotfiles: {repository.url} at {(fetched.commit or '?')[:12]} ({what}) in "
            f"{time.monotonic() - started:.1f}s; installed into ~/dotfiles after postCreateCommand"
        )
        mount = Mount(MountKind.VOLUME, str(dotfiles.SOURCE), source=_DOTFILES_VOLUME, read_only=True)
        install = lifecycle.HookCommand("postCreateCommand", ("/bin/sh", "-c", fetched.command()), "dotfiles")
        after = lifecycle.HOOKS.index("postCreateCommand")
        commands = [c for c in plan.commands if lifecycle.HOOKS.index(c.hook) <= after]
        commands += [install, *(c for c in plan.commands if lifecycle.HOOKS.index(c.hook) > after)]
        return (
            dataclasses.replace(spec, mounts=(*spec.mounts, mount)),
            dataclasses.replace(plan, commands=tuple(commands)),
        )

    def _config(self, environment: Environment, workspace: Path, name: str) -> DevContainerConfig | None:
        """The workspace's devcontainer.json, loaded; None when it has none (and none was asked for)."""
        asked = environment.spec.devcontainer_path
        try:
            path = dev_container_config.find(workspace, asked)
        except ConfigNotFound:
            if asked is not None:
                raise
            return None
        return dev_container_config.load(
            path,
            repository=workspace,
            devcontainer_id=substitution.devcontainer_id({"devyard.environment": environment.metadata.id}),
            workspace_name=name,
            source=str(path.relative_to(workspace)),
        )

    async def _resolve(
        self, environment: Environment, base: ContainerSpec, config: DevContainerConfig, build_log: _BuildLog
    ) -> tuple[ContainerSpec, lifecycle.LifecyclePlan]:
        key = environment.metadata.id
        workspace = self.runtime.workspace(key)
        await self._initialize(config, workspace, build_log)
        source: str | BuildSpec
        if environment.spec.image:
            source = base.image  # the user's override: "use this image instead of the dev container's"
        elif config.build is not None:
            source = BuildSpec(
                context=config.build.context,
                dockerfile=config.build.dockerfile,
                args=dict(config.build.args),
                target=config.build.target or "",
                options=config.build.options,
            )
        elif config.image is not None:
            source = config.image
        else:  # load refuses a config with neither
            raise PermanentError(f"{config.path}: neither image nor build")
        features: list[ResolvedFeature] = []
        if config.features:
            # With a Dockerfile, one build: the Features' stages come after its own (see _install_features).
            image, features = await self._install_features(key, config, source, base, build_log)
        elif isinstance(source, BuildSpec):
            image = await self._build(key, source, base, build_log)
        else:
            image = source
        pulling = time.monotonic()
        labels = await self.runtime.image_labels(key, image, credentials=base.registry_credentials)
        self._pulled[key] = round(time.monotonic() - pulling, 3)
        label = labels.get(image_metadata.LABEL)
        image_entries = image_metadata.parse_label(label) if label else []
        merged = image_metadata.merge(image_entries, [metadata_entry(f) for f in features], config)
        _check_host_requirements(merged, base)
        # What status.ports says of forwarded ports and their labels, read by the reconciler at each report.
        self.directory(key).mkdir(parents=True, exist_ok=True)
        port_detection.keep_declared(
            self.directory(key),
            forward_ports=merged.forward_ports,
            app_ports=config.app_ports,
            ports_attributes=merged.ports_attributes,
        )
        mounts = [_workspace_mount(config)]
        for mount in merged.mounts:
            converted = _mount(mount, build_log)
            if converted is not None:
                mounts.append(converted)
        remote_user = merged.remote_user or merged.container_user
        container_env = {**merged.container_env, **base.env}
        remote_env = {
            name: str(value)
            for name, value in substitution.substitute_container_env(dict(merged.remote_env), container_env).items()
            if value is not None
        }
        spec = dataclasses.replace(
            base,
            image=image,
            env=container_env,
            mounts=tuple(mounts),
            user=merged.container_user,
            override_command=merged.override_command,
            capabilities=merged.cap_add,
            privileged=merged.privileged,
            remote_user=remote_user,
            remote_env=remote_env,
            workdir=config.workspace_folder,
        )
        commands = tuple(
            lifecycle.HookCommand(hook, command.command, command.origin)
            for hook in lifecycle.HOOKS
            for command in merged.hooks.get(hook, ())
        )
        plan = lifecycle.LifecyclePlan(
            commands=commands, wait_for=merged.wait_for, user=remote_user, cwd=config.workspace_folder, env=remote_env
        )
        build_log.line(f"dev container {config.name or key}: image {image}, workspace {config.workspace_folder}")
        return spec, plan

    async def _initialize(self, config: DevContainerConfig, workspace: Path, build_log: _BuildLog) -> None:
        """``initializeCommand`` runs on the host: only on a desktop runner, whose host is the user's."""
        command = config.hooks.get("initializeCommand")
        if command is None:
            return
        if not self.desktop:
            raise PermanentError(
                f"{config.path.relative_to(workspace)}: initializeCommand runs on the runner's host, which a shared "
                "runner does not allow; remove it, or use onCreateCommand, which runs inside the environment"
            )
        build_log.line("running initializeCommand on this host")
        parts = command.command.values() if isinstance(command.command, Mapping) else [command.command]
        for part in parts:
            argv = ["/bin/sh", "-c", part] if isinstance(part, str) else list(part)
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=workspace, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            output, _ = await process.communicate()
            build_log.write(output)
            if process.returncode != 0:
                raise PermanentError(f"initializeCommand failed with exit code {process.returncode}")

    async def _build(self, key: str, spec: BuildSpec, base: ContainerSpec, build_log: _BuildLog) -> str:
        if self.images is None:
            raise PermanentError(f"this runner's {self.runtime.name} runtime cannot build images")
        build_log.line(f"building {spec.dockerfile.name} in {spec.context.name or '.'}")
        credentials = dict(base.registry_credentials)
        # A namespace for RUN steps costs about 0.1 s to attach and detach: only a build that runs buildah gets one.
        built = await builder.cached(self.images, spec, credentials=credentials)
        if built is not None:
            build_log.line(f"built {built.reference} (cached)")
            return built.reference
        async with self._build_network(key) as network_namespace:
            built = await builder.build(
                self.images,
                builder.builds_root(self.state_dir.parent),
                spec,
                output=build_log.line,
                credentials=credentials,
                network_namespace=network_namespace,
            )
        build_log.line(f"built {built.reference}{' (cached)' if built.cached else ''}")
        if not built.cached:
            # The build cache stays bounded: older builds no environment holds go, in the background (collecting
            # waits for running pulls).
            pruning = asyncio.create_task(self._prune_builds(), name="prune-builds")
            self._background.add(pruning)
            pruning.add_done_callback(self._background.discard)
        return built.reference

    async def _prune_builds(self) -> None:
        assert self.images is not None
        try:
            pruned = await self.images.prune(builder.BUILD_REPOSITORY, keep=_KEPT_BUILDS)
        except (RunnerError, OSError) as exc:
            log.warning("cannot prune the build cache: %s", exc)
            return
        if pruned:
            log.info("pruned %d old builds from the image store: %s", len(pruned), ", ".join(pruned))

    async def _install_features(
        self, key: str, config: DevContainerConfig, image: str | BuildSpec, base: ContainerSpec, build_log: _BuildLog
    ) -> tuple[str, list[ResolvedFeature]]:
        """Build the image with the Features installed on ``image``: a small Dockerfile of their own on an
        image, or, on a Dockerfile, their stages appended to it and one build of both (as the reference CLI
        does): one buildah run, one push and one import instead of two, and no second copy of the base."""
        if self.images is None:
            raise PermanentError(f"this runner's {self.runtime.name} runtime cannot install Features")
        root = features_root(self.state_dir.parent)
        async with FeatureCache.for_store(self.images, root, credentials=dict(base.registry_credentials)) as cache:
            resolved = await resolve_features(
                config.features,
                config_file=config.path,
                source=cache,
                override_order=config.override_feature_install_order,
            )
        build_log.line("Features, in install order: " + ", ".join(f.describe() for f in resolved))
        # The first environment of a new runner reaches here before anything made the directory.
        self.directory(key).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.directory(key).parent, prefix=".features-") as scratch:
            context = Path(scratch) / "context"
            users = {"container_user": config.container_user or "root", "remote_user": config.remote_user or ""}
            if isinstance(image, BuildSpec):
                try:
                    text = image.dockerfile.read_text()
                except OSError as exc:
                    raise PermanentError(f"the Dockerfile {image.dockerfile} cannot be read: {exc}") from exc
                named, stage = builder.named_target(text, image.target, dockerfile=image.dockerfile)
                stages = write_build_context(
                    context, base_image=stage, features=resolved, content_from=_FEATURES_CONTEXT, **users
                )
                dockerfile = Path(scratch) / "Dockerfile"
                dockerfile.write_text(named.rstrip("\n") + "\n\n" + stages.read_text())
                spec = dataclasses.replace(
                    image,
                    dockerfile=dockerfile,
                    target="",
                    contexts={**image.contexts, _FEATURES_CONTEXT: context / "features"},
                )
            else:
                dockerfile = write_build_context(context, base_image=image, features=resolved, **users)
                spec = BuildSpec(context=dockerfile.parent, dockerfile=dockerfile)
            try:
                built = await self._build(key, spec, base, build_log)
            except PermanentError as exc:
                if not isinstance(image, BuildSpec):
                    raise
                # The user's Dockerfile, not the scratch copy (its lines are the same: stages only follow them).
                shown = str(exc).replace(str(dockerfile), f"{image.dockerfile} (with the Features' stages after it)")
                if isinstance(exc, builder.BuildFailed):
                    raise builder.BuildFailed(shown, step=exc.step, output=exc.output) from exc
                raise PermanentError(shown) from exc
        return built, resolved

    @contextlib.asynccontextmanager
    async def _build_network(self, key: str) -> AsyncIterator[Path | None]:
        """A network namespace for a build's RUN steps, on the runner's network with an environment's rules."""
        if self.network is None:
            yield None
            return
        name = f"{key}-build"
        attachment = await self.network.attach(name, hostname="build")
        try:
            yield attachment.netns_path
        finally:
            await self.network.detach(name)

    def plan(self, environment_id: str) -> lifecycle.LifecyclePlan | None:
        return lifecycle.load_plan(self.directory(environment_id))

    def automations_file(self, environment_id: str) -> str | None:
        return self._made_with(environment_id, "automations_file")

    def rebuild_request(self, environment_id: str) -> str | None:
        """The ``spec.rebuild_request`` the environment's container was made for."""
        return self._made_with(environment_id, "rebuild_request")

    def _made_with(self, environment_id: str, name: str) -> str | None:
        try:
            document = json.loads((self.directory(environment_id) / "dev-container.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        found = document.get(name) if isinstance(document, dict) else None
        return str(found) if isinstance(found, str) else None

    def automations(self, environment_id: str) -> Automations | None:
        """The automations of the environment's workspace, or None without a file (or content). Raises
        ``AutomationsFileError`` for a file with problems."""
        workspace = self.runtime.workspace(environment_id)
        path = find_automations_file(workspace, self.automations_file(environment_id))
        if path is None:
            return None
        automations = load_automations(path, shown_as=str(path.relative_to(workspace)))
        return automations if automations.services or automations.tasks else None

    def fired_triggers(self, environment_id: str) -> tuple[str | None, str | None] | None:
        """The container (its ``created_at``) and start (``started_at``) whose automation triggers fired last."""
        try:
            document = json.loads((self.directory(environment_id) / "triggers.json").read_text())
            return (document["container"], document["start"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def keep_fired_triggers(self, environment_id: str, fired: tuple[str | None, str | None]) -> None:
        document = {"container": fired[0], "start": fired[1]}
        write_atomically(self.directory(environment_id) / "triggers.json", json.dumps(document).encode())

    def handled_requests(self, environment_id: str) -> dict[str, str]:
        """Automation id -> the id of the last request to start or stop it that the runner acted on."""
        try:
            document = json.loads((self.directory(environment_id) / "requests.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {str(k): str(v) for k, v in document.items()} if isinstance(document, dict) else {}

    def keep_handled_requests(self, environment_id: str, handled: Mapping[str, str]) -> None:
        write_atomically(self.directory(environment_id) / "requests.json", json.dumps(dict(handled)).encode())

    def remove(self, environment_id: str) -> None:
        shutil.rmtree(self.directory(environment_id), ignore_errors=True)
        shutil.rmtree(self.logs(environment_id), ignore_errors=True)

    def _keep(self, environment_id: str, prepared: Prepared) -> None:
        directory = self.directory(environment_id)
        lifecycle.save_plan(directory, prepared.plan)
        document: dict[str, Any] = {
            "automations_file": prepared.automations_file,
            "rebuild_request": prepared.rebuild_request,
            "made_at": time.time(),
        }
        write_atomically(directory / "dev-container.json", json.dumps(document).encode())


def workspace_name(content: ContentSpec) -> str:
    """The workspace folder's name: the repository's or the folder's base name (``/workspaces/<name>``)."""
    if content.git is not None:
        path = content.git.url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        name = path.removesuffix(".git")
    else:
        name = PurePosixPath(content.local_path or "").name
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip(".-")
    if not cleaned:
        raise PermanentError(f"cannot name a workspace folder after {content.model_dump(exclude_none=True)}")
    return cleaned


class _BuildLog:
    """The environment's ``build.log``: what making its dev container said."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def line(self, text: str) -> None:
        self.write((text.rstrip("\n") + "\n").encode(errors="replace"))

    def write(self, data: bytes) -> None:
        with self.path.open("ab") as file:
            file.write(data)


def _workspace_mount(config: DevContainerConfig) -> Mount:
    """The repository at workspaceMount's target (by default ``/workspaces/<name>``); its source is always the
    workspace the runner fetched."""
    return Mount(MountKind.WORKSPACE, config.workspace_mount.target)


def _mount(mount: DevContainerMount, build_log: _BuildLog) -> Mount | None:
    """A devcontainer.json mount as the runtime makes it: volumes and tmpfs; a bind of a host path is skipped
    (with a line in the build log): what an environment sees of the host is only what the runner owns for it."""
    if mount.type == "tmpfs":
        return Mount(MountKind.TMPFS, mount.target)
    if mount.type == "volume":
        source = "".join(c if c.isalnum() or c in "._-" else "-" for c in (mount.source or mount.target)).strip(".-")
        return Mount(MountKind.VOLUME, mount.target, source=source or "volume", read_only=mount.read_only)
    build_log.line(f"skipped the bind mount of {mount.source} at {mount.target}: runners do not share host paths")
    return None


def _check_host_requirements(merged: MergedConfig, base: ContainerSpec) -> None:
    """hostRequirements against the environment class: refused when the class is too small or offers no GPU."""
    needs = merged.host_requirements
    problems = []
    if merged.gpus is not None:
        problems.append(f"runArgs --gpus {merged.gpus}: this environment class offers no GPUs")
    if needs is not None:
        if needs.gpu is not None and needs.gpu.required is True:
            problems.append("hostRequirements.gpu: this environment class offers no GPUs")
        if needs.cpus is not None and base.cpu is not None and needs.cpus > base.cpu:
            problems.append(f"hostRequirements.cpus is {needs.cpus}, the environment class has {base.cpu:g}")
        if needs.memory is not None and base.memory_mib is not None and needs.memory > base.memory_mib * 2**20:
            problems.append(
                f"hostRequirements.memory is {needs.memory / 2**30:.1f} GiB, the environment class has "
                f"{base.memory_mib / 1024:.1f} GiB"
            )
        if needs.storage is not None and base.disk_gib is not None and needs.storage > base.disk_gib * 2**30:
            problems.append(
                f"hostRequirements.storage is {needs.storage / 2**30:.1f} GiB, the environment class has "
                f"{base.disk_gib} GiB"
            )
    if problems:
        raise PermanentError("; ".join(problems) + ": choose a larger environment class")
