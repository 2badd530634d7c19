"""A repository's devcontainer.json: found, parsed, validated and resolved into what devyard supports.

The runner calls ``find`` once the repository's content is on the host, then ``load``: JSONC parsing, validation
against the official schema, variables substituted (``substitution``), paths resolved against the config's folder
and kept inside the repository, runArgs read into what devyard supports, lifecycle commands normalized. The
result, a ``DevContainerConfig``, is then merged with the image's and the Features' metadata (``image_metadata``).

What devyard refuses, with a ``ConfigError`` at the line and column: Docker Compose configs, runArgs other than
``-e/--env``, ``--cap-add``, ``--security-opt``, ``--init``, ``--privileged`` and ``--gpus``, paths that leave the
repository, mounts it cannot make. Properties for other tools (``customizations``, ``secrets``...) are kept raw or
ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from devyard.devcontainer import jsonc, schema, substitution
from devyard.devcontainer.errors import ConfigError
from devyard.devcontainer.jsonc import Positions

__all__ = [
    "HOOKS",
    "Build",
    "ConfigNotFound",
    "DevContainerConfig",
    "ForwardPort",
    "GpuRequirement",
    "HostRequirements",
    "LifecycleCommand",
    "Mount",
    "RunArgs",
    "find",
    "lifecycle_command",
    "load",
    "parse_forward_port",
    "parse_host_requirements",
    "parse_mount",
    "parse_size",
]

#: The lifecycle hooks, in the order they run; ``initializeCommand`` runs on the host, before the container.
HOOKS: Final = (
    "initializeCommand",
    "onCreateCommand",
    "updateContentCommand",
    "postCreateCommand",
    "postStartCommand",
    "postAttachCommand",
)

#: One command: a shell string (run by ``/bin/sh -c``), an argv, or named commands of either kind run in parallel.
Command = str | tuple[str, ...] | Mapping[str, str | tuple[str, ...]]

_SUPPORTED_RUN_ARGS: Final = "-e/--env NAME=VALUE, --cap-add, --security-opt, --init, --privileged and --gpus"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?b)?", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


class ConfigNotFound(ConfigError):
    """The repository has no devcontainer.json (where ``find`` looks): the caller uses its default image."""


@dataclass(frozen=True)
class Build:
    """devcontainer.json's ``build`` (or the legacy top-level ``dockerFile``/``context``), paths absolute and
    inside the repository."""

    dockerfile: Path
    context: Path
    args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    options: tuple[str, ...] = ()
    cache_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mount:
    """A mount, from the string (``--mount`` syntax) or the object form. ``source`` is a host path for a bind, a
    volume's name (``None``: an anonymous volume), ``None`` for a tmpfs."""

    type: Literal["bind", "volume", "tmpfs"]
    target: str
    source: str | None = None
    read_only: bool = False


@dataclass(frozen=True)
class ForwardPort:
    """A port of forwardPorts: ``3000`` (the container's), or ``"db:5432"`` (another host's)."""

    port: int
    host: str | None = None

    def __str__(self) -> str:
        return str(self.port) if self.host is None else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class LifecycleCommand:
    """One hook's command, and where it comes from (``devcontainer.json``, a Feature's id, ``image``)."""

    command: Command
    origin: str = "devcontainer.json"

    @property
    def parallel(self) -> bool:
        """Whether it is the object form: named commands run at the same time, all of which must succeed."""
        return isinstance(self.command, Mapping)


@dataclass(frozen=True)
class RunArgs:
    """What devyard takes from ``runArgs``."""

    env: Mapping[str, str] = field(default_factory=dict)
    cap_add: tuple[str, ...] = ()
    security_opt: tuple[str, ...] = ()
    init: bool | None = None
    privileged: bool | None = None
    gpus: str | None = None


@dataclass(frozen=True)
class GpuRequirement:
    """hostRequirements.gpu: ``required`` (``True``), ``"optional"`` or not at all (``False``); with an object, the
    minimum cores and memory (bytes)."""

    required: bool | Literal["optional"] = False
    cores: int | None = None
    memory: int | None = None


@dataclass(frozen=True)
class HostRequirements:
    """hostRequirements, amounts in bytes."""

    cpus: int | None = None
    memory: int | None = None
    storage: int | None = None
    gpu: GpuRequirement | None = None


@dataclass(frozen=True)
class DevContainerConfig:
    """A resolved devcontainer.json. Properties devcontainer.json leaves unset are ``None`` where the merge with
    image and Feature metadata decides them (``image_metadata``), their spec defaults otherwise."""

    path: Path
    repository: Path
    #: Where tools and hooks work (the spec's default: ``/workspaces/<name>``, the workspace mount's target).
    workspace_folder: str
    #: The repository in the container; by default, as the spec says, a bind of the repository at
    #: ``/workspaces/<name>`` (even when ``workspaceFolder`` names another folder, such as a subfolder of it).
    workspace_mount: Mount
    name: str | None = None
    image: str | None = None
    build: Build | None = None
    features: Mapping[str, Any] = field(default_factory=dict)
    override_feature_install_order: tuple[str, ...] = ()
    container_env: Mapping[str, str] = field(default_factory=dict)
    remote_env: Mapping[str, str | None] = field(default_factory=dict)
    container_user: str | None = None
    remote_user: str | None = None
    update_remote_user_uid: bool | None = None
    mounts: tuple[Mount, ...] = ()
    forward_ports: tuple[ForwardPort, ...] = ()
    ports_attributes: Mapping[str, Any] = field(default_factory=dict)
    other_ports_attributes: Mapping[str, Any] | None = None
    #: The legacy appPort, as written: ``"3000"`` or ``"8080:80"``.
    app_ports: tuple[str, ...] = ()
    hooks: Mapping[str, LifecycleCommand] = field(default_factory=dict)
    wait_for: str | None = None
    override_command: bool | None = None
    cap_add: tuple[str, ...] = ()
    security_opt: tuple[str, ...] = ()
    privileged: bool | None = None
    init: bool | None = None
    run_args: RunArgs = field(default_factory=RunArgs)
    host_requirements: HostRequirements | None = None
    shutdown_action: str | None = None
    user_env_probe: str | None = None
    customizations: Mapping[str, Any] = field(default_factory=dict)


def find(root: Path, name: str | None = None) -> Path:
    """The devcontainer.json of the repository at ``root``: ``.devcontainer/devcontainer.json``, else
    ``.devcontainer.json``, else the one ``.devcontainer/NAME/devcontainer.json``. ``name`` picks a NAME folder, or
    is a path relative to ``root``. Raises ``ConfigNotFound`` without one, ``ConfigError`` when several NAME folders
    leave the choice open or the file is outside the repository."""
    root = root.resolve()
    if name is not None:
        if "/" in name or name.endswith(".json"):
            candidate = root / name
        else:
            candidate = root / ".devcontainer" / name / "devcontainer.json"
        if not candidate.is_file():
            named = _named_configs(root)
            choices = f" (there are: {', '.join(named)})" if named else ""
            raise ConfigNotFound(str(root), None, None, f"no dev container config {name!r}{choices}")
        return _inside(root, candidate)
    for candidate in (root / ".devcontainer" / "devcontainer.json", root / ".devcontainer.json"):
        if candidate.is_file():
            return _inside(root, candidate)
    named = _named_configs(root)
    if len(named) == 1:
        return _inside(root, root / ".devcontainer" / named[0] / "devcontainer.json")
    if named:
        raise ConfigError(
            str(root / ".devcontainer"),
            None,
            None,
            f"several dev container configs: {', '.join(named)}; choose one by its name",
        )
    raise ConfigNotFound(
        str(root),
        None,
        None,
        "no devcontainer.json (looked for .devcontainer/devcontainer.json, .devcontainer.json and "
        ".devcontainer/NAME/devcontainer.json)",
    )


def _named_configs(root: Path) -> list[str]:
    folder = root / ".devcontainer"
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if (entry / "devcontainer.json").is_file())


def _inside(root: Path, path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ConfigError(str(path), None, None, f"the config is {resolved}, outside the repository {root}")
    return path


def load(
    path: Path,
    *,
    repository: Path | None = None,
    local_env: Mapping[str, str] | None = None,
    devcontainer_id: str | None = None,
    workspace_name: str | None = None,
    source: str | None = None,
) -> DevContainerConfig:
    """The devcontainer.json at ``path``, parsed, validated and resolved.

    ``repository`` is the repository's root on the host (``${localWorkspaceFolder}``; by default the folder that
    holds ``.devcontainer/``, or the file's folder): paths may not leave it. ``local_env`` is what
    ``${localEnv:NAME}`` reads (nothing by default: the runner's environment is not the user's).
    ``devcontainer_id`` is what ``${devcontainerId}`` becomes (see ``substitution.devcontainer_id``),
    ``workspace_name`` the default workspace folder's name (``/workspaces/<name>``, the repository folder's name
    by default), ``source`` how messages name the file.
    Raises ``ConfigError``.
    """
    path = path.resolve()
    if repository is None:
        # The folder that holds .devcontainer/ (.devcontainer/NAME/devcontainer.json included), else the file's.
        holders = [folder.parent for folder in (path.parent, *path.parent.parents) if folder.name == ".devcontainer"]
        repository = holders[0] if holders else path.parent
    repository = repository.resolve()
    shown = source if source is not None else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(shown, None, None, f"cannot read the config: {exc}") from None
    document, positions = jsonc.parse_with_positions(text, source=shown)
    return _Resolver(shown, positions, path, repository, dict(local_env or {}), devcontainer_id, workspace_name).config(
        document
    )


def lifecycle_command(value: Any, *, origin: str = "devcontainer.json") -> LifecycleCommand | None:
    """A hook's value (a string, an argv list, or a mapping of name to either), normalized; ``None`` for an
    empty one (nothing to run). Raises ``ValueError`` for another shape."""
    if isinstance(value, str):
        return LifecycleCommand(value, origin) if value.strip() else None
    if isinstance(value, list):
        argv = _argv(value)
        return LifecycleCommand(argv, origin) if argv else None
    if isinstance(value, Mapping):
        parallel: dict[str, str | tuple[str, ...]] = {}
        for key, item in value.items():
            if isinstance(item, str):
                if item.strip():
                    parallel[str(key)] = item
            elif isinstance(item, list):
                argv = _argv(item)
                if argv:
                    parallel[str(key)] = argv
            elif item is not None:
                raise ValueError(f"{key}: expected a string or an array of strings")
        return LifecycleCommand(parallel, origin) if parallel else None
    if value is None:
        return None
    raise ValueError("expected a string, an array of strings or an object")


def _argv(value: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(item, str) for item in value):
        raise ValueError("an argv must be an array of strings")
    return tuple(value)


def parse_mount(value: Any) -> Mount:
    """A mount in devcontainer.json's string form (``type=volume,source=x,target=/y,readonly``, the ``--mount``
    syntax) or object form. Raises ``ValueError`` saying what is wrong."""
    if isinstance(value, Mapping):
        fields = {str(key): item for key, item in value.items()}
    elif isinstance(value, str):
        fields = {}
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            key, equals, item = part.partition("=")
            fields[key.strip().lower()] = item.strip() if equals else True
    else:
        raise ValueError("a mount is a string or an object")
    kind = fields.pop("type", "volume")
    source = _first_of(fields, "source", "src")
    target = _first_of(fields, "target", "destination", "dst")
    read_only = False
    for key in ("readonly", "ro"):
        if key in fields:
            flag = fields.pop(key)
            if flag is True or str(flag).lower() in ("true", "1"):
                read_only = True
            elif str(flag).lower() not in ("false", "0"):
                raise ValueError(f"{key}={flag}: expected true or false")
    fields.pop("consistency", None)  # a Docker Desktop for macOS tuning; meaningless here
    if fields:
        raise ValueError(f"mount option {', '.join(sorted(fields))} is not supported")
    if kind not in ("bind", "volume", "tmpfs"):
        raise ValueError(f"mount type {kind!r} is not supported (bind, volume or tmpfs)")
    if not isinstance(target, str) or not target.startswith("/"):
        raise ValueError("a mount needs an absolute target path")
    if source is not None and not isinstance(source, str):
        raise ValueError("a mount's source is a string")
    if kind == "bind" and not source:
        raise ValueError("a bind mount needs a source")
    if kind == "tmpfs" and source:
        raise ValueError("a tmpfs mount has no source")
    return Mount(kind, target, source or None, read_only)


def _first_of(fields: dict[str, Any], *names: str) -> Any:
    found = [fields.pop(name) for name in names if name in fields]
    return found[0] if found else None


def parse_size(value: str) -> int:
    """Bytes in an amount such as ``"4gb"``, ``"512mb"``, ``"1.5tb"`` (units of 1024). Raises ``ValueError``."""
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f'{value!r} is not an amount such as "4gb"')
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])


def parse_host_requirements(value: Mapping[str, Any]) -> HostRequirements:
    """hostRequirements (of devcontainer.json or an image label). Raises ``ValueError``."""
    cpus = value.get("cpus")
    memory = value.get("memory")
    storage = value.get("storage")
    gpu_value = value.get("gpu")
    gpu: GpuRequirement | None = None
    if isinstance(gpu_value, bool) or gpu_value == "optional":
        gpu = GpuRequirement(required=gpu_value)
    elif isinstance(gpu_value, Mapping):
        cores = gpu_value.get("cores")
        gpu_memory = gpu_value.get("memory")
        gpu = GpuRequirement(
            required=True,
            cores=int(cores) if isinstance(cores, int) else None,
            memory=parse_size(gpu_memory) if isinstance(gpu_memory, str) else None,
        )
    elif gpu_value is not None:
        raise ValueError(f'gpu: {gpu_value!r} is not true, false, "optional" or an object')
    return HostRequirements(
        cpus=int(cpus) if isinstance(cpus, int | float) else None,
        memory=parse_size(memory) if isinstance(memory, str) else None,
        storage=parse_size(storage) if isinstance(storage, str) else None,
        gpu=gpu,
    )


def parse_forward_port(value: Any) -> ForwardPort:
    """A forwardPorts entry: a port number or ``"host:port"``. Raises ``ValueError``."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65535:
        return ForwardPort(value)
    if isinstance(value, str):
        host, colon, port = value.rpartition(":")
        if port.isdigit() and 0 < int(port) <= 65535:
            return ForwardPort(int(port), host if colon and host else None)
    raise ValueError(f'{value!r} is not a port number or "host:port"')


class _Resolver:
    """Turns a parsed document into a ``DevContainerConfig``, with positions for its errors."""

    def __init__(
        self,
        source: str,
        positions: Positions,
        path: Path,
        repository: Path,
        local_env: dict[str, str],
        devcontainer_id: str | None,
        workspace_name: str | None,
    ) -> None:
        self.source = source
        self.positions = positions
        self.path = path
        self.repository = repository
        self.local_env = local_env
        self.devcontainer_id = devcontainer_id
        self.workspace_name = workspace_name or repository.name

    def fail(self, path: Sequence[str | int], message: str, *, on_key: bool = False) -> ConfigError:
        where = self.positions.key_at(path) if on_key else None
        line, column = where or self.positions.nearest(path)
        return ConfigError(self.source, line, column, message)

    def config(self, raw: Any) -> DevContainerConfig:
        if isinstance(raw, dict) and "dockerComposeFile" in raw:
            raise self.fail(
                ("dockerComposeFile",),
                "Docker Compose configs (dockerComposeFile) are not supported by devyard: "
                'describe the dev container with "image" or "build" instead',
                on_key=True,
            )
        schema.validate(raw, self.positions, source=self.source)
        document: dict[str, Any] = raw
        if "image" not in document and "build" not in document and "dockerFile" not in document:
            raise self.fail((), 'the config has neither "image" nor "build": say which image the dev container uses')
        local = str(self.repository)
        early = substitution.LoadContext(local, None, self.local_env, self.devcontainer_id)
        workspace_folder = f"/workspaces/{self.workspace_name}"
        if isinstance(document.get("workspaceFolder"), str):
            workspace_folder = substitution.substitute(document["workspaceFolder"], early)
            if not workspace_folder.startswith("/"):
                raise self.fail(("workspaceFolder",), "workspaceFolder: expected an absolute path in the container")
        context = substitution.LoadContext(local, workspace_folder, self.local_env, self.devcontainer_id)
        document = substitution.substitute(document, context)
        if "workspaceMount" in document and "workspaceFolder" not in document:
            raise self.fail(("workspaceMount",), "workspaceMount needs workspaceFolder: where the mount's target is")

        run_args = self.run_args(document.get("runArgs", []))
        host_requirements = None
        if "hostRequirements" in document:
            try:
                host_requirements = parse_host_requirements(document["hostRequirements"])
            except ValueError as exc:
                raise self.fail(("hostRequirements",), f"hostRequirements: {exc}") from None
        hooks: dict[str, LifecycleCommand] = {}
        for hook in HOOKS:
            try:
                command = lifecycle_command(document.get(hook))
            except ValueError as exc:
                raise self.fail((hook,), f"{hook}: {exc}") from None
            if command is not None:
                hooks[hook] = command
        return DevContainerConfig(
            path=self.path,
            repository=self.repository,
            workspace_folder=workspace_folder,
            name=document.get("name"),
            image=document.get("image"),
            build=self.build(document),
            features=dict(document.get("features", {})),
            override_feature_install_order=tuple(document.get("overrideFeatureInstallOrder", ())),
            container_env=dict(document.get("containerEnv", {})),
            remote_env=dict(document.get("remoteEnv", {})),
            container_user=document.get("containerUser"),
            remote_user=document.get("remoteUser"),
            update_remote_user_uid=document.get("updateRemoteUserUID"),
            workspace_mount=(
                self.mount(document, ("workspaceMount",))
                if "workspaceMount" in document
                else Mount("bind", f"/workspaces/{self.workspace_name}", str(self.repository))
            ),
            mounts=tuple(self.mount(document, ("mounts", index)) for index in range(len(document.get("mounts", [])))),
            forward_ports=self.forward_ports(document.get("forwardPorts", [])),
            ports_attributes=dict(document.get("portsAttributes", {})),
            other_ports_attributes=document.get("otherPortsAttributes"),
            app_ports=self.app_ports(document.get("appPort")),
            hooks=hooks,
            wait_for=document.get("waitFor"),
            override_command=document.get("overrideCommand"),
            cap_add=tuple(document.get("capAdd", ())),
            security_opt=tuple(document.get("securityOpt", ())),
            privileged=document.get("privileged"),
            init=document.get("init"),
            run_args=run_args,
            host_requirements=host_requirements,
            shutdown_action=document.get("shutdownAction"),
            user_env_probe=document.get("userEnvProbe"),
            customizations=dict(document.get("customizations", {})),
        )

    def build(self, document: Mapping[str, Any]) -> Build | None:
        build = document.get("build")
        if build is None and "dockerFile" not in document:
            return None
        if build is None or "dockerfile" not in build:
            # The legacy form: top-level dockerFile and context, build holding only options.
            build = {**(build or {}), "dockerfile": document["dockerFile"]}
            if "context" in document:
                build["context"] = document["context"]
            where: dict[str, tuple[str, ...]] = {"dockerfile": ("dockerFile",), "context": ("context",)}
        else:
            where = {"dockerfile": ("build", "dockerfile"), "context": ("build", "context")}
        folder = self.path.parent
        dockerfile = self.inside(folder / build["dockerfile"], where["dockerfile"], "the Dockerfile")
        context = self.inside(folder / build.get("context", "."), where["context"], "the build context")
        cache_from = build.get("cacheFrom", ())
        return Build(
            dockerfile=dockerfile,
            context=context,
            args=dict(build.get("args", {})),
            target=build.get("target"),
            options=tuple(build.get("options", ())),
            cache_from=(cache_from,) if isinstance(cache_from, str) else tuple(cache_from),
        )

    def inside(self, path: Path, where: Sequence[str | int], what: str) -> Path:
        resolved = Path(os.path.normpath(path)).resolve()
        if not resolved.is_relative_to(self.repository):
            raise self.fail(
                where, f"{schema.describe_path(where)}: {what} {resolved} is outside the repository {self.repository}"
            )
        return resolved

    def mount(self, document: Mapping[str, Any], where: tuple[str | int, ...]) -> Mount:
        value: Any = document
        for part in where:
            value = value[part]
        try:
            return parse_mount(value)
        except ValueError as exc:
            raise self.fail(where, f"{schema.describe_path(where)}: {exc}") from None

    def forward_ports(self, values: list[Any]) -> tuple[ForwardPort, ...]:
        ports = []
        for index, value in enumerate(values):
            try:
                ports.append(parse_forward_port(value))
            except ValueError as exc:
                raise self.fail(("forwardPorts", index), f"forwardPorts[{index}]: {exc}") from None
        return tuple(ports)

    def app_ports(self, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        return tuple(str(item) for item in values)

    def run_args(self, values: list[str]) -> RunArgs:
        env: dict[str, str] = {}
        cap_add: list[str] = []
        security_opt: list[str] = []
        init: bool | None = None
        privileged: bool | None = None
        gpus: str | None = None
        index = 0
        while index < len(values):
            where = ("runArgs", index)
            argument = values[index]
            flag, equals, inline = argument.partition("=")
            if not argument.startswith("--"):
                flag, equals, inline = argument, "", ""
                if argument.startswith("-e") and len(argument) > 2:
                    flag, equals, inline = "-e", "=", argument[2:]
            if flag in ("--init", "--privileged"):
                if equals and inline.lower() not in ("true", "false"):
                    raise self.fail(
                        where, f"runArgs[{index}]: {argument!r}: expected {flag}, {flag}=true or {flag}=false"
                    )
                on = not equals or inline.lower() == "true"
                if flag == "--init":
                    init = on
                else:
                    privileged = on
                index += 1
                continue
            if flag not in ("-e", "--env", "--cap-add", "--security-opt", "--gpus"):
                raise self.fail(
                    where, f"runArgs[{index}]: {argument!r} is not supported (devyard supports {_SUPPORTED_RUN_ARGS})"
                )
            if equals:
                value = inline
                index += 1
            else:
                if index + 1 >= len(values):
                    raise self.fail(where, f"runArgs[{index}]: {argument!r} needs a value after it")
                value = values[index + 1]
                index += 2
            if flag in ("-e", "--env"):
                name, has_value, env_value = value.partition("=")
                if not has_value or not name:
                    raise self.fail(
                        where,
                        f"runArgs[{where[1]}]: {flag} {value!r}: expected NAME=VALUE (devyard does not pass the "
                        "runner's environment on)",
                    )
                env[name] = env_value
            elif flag == "--cap-add":
                cap_add.append(value)
            elif flag == "--security-opt":
                security_opt.append(value)
            else:
                gpus = value
        return RunArgs(env, tuple(cap_add), tuple(security_opt), init, privileged, gpus)
