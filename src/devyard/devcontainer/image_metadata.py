"""The ``devcontainer.metadata`` image label, and the merge of metadata into the configuration the runner uses.

An image built for dev containers carries devcontainer.json snippets in its ``devcontainer.metadata`` label (a
JSON array of entries, or one object); Features bring entries of the same shape (their devcontainer-feature.json
properties, with their ``id``). ``merge`` combines the image's entries, then the Features', then devcontainer.json
itself, by the spec's merge logic (https://containers.dev/implementors/spec/#merge-logic):

- ``init``, ``privileged``: true if any says so; ``capAdd``, ``securityOpt``, ``forwardPorts``: unions in order;
- ``entrypoint``, ``customizations``, and each lifecycle hook: collected in order (a hook runs all its commands);
- ``mounts``: collected, the last one per target wins;
- ``containerEnv``, ``remoteEnv``, ``portsAttributes``: merged, the last value per key wins;
- ``containerUser``, ``remoteUser``, ``userEnvProbe``, ``updateRemoteUserUID``, ``overrideCommand``,
  ``shutdownAction``, ``waitFor``, ``otherPortsAttributes``: the last one given wins;
- ``hostRequirements``: the maximum of each.

Called by the runner once it knows the image's labels and the Features it installs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from devyard.devcontainer import config as config_module
from devyard.devcontainer import jsonc
from devyard.devcontainer.config import (
    DevContainerConfig,
    ForwardPort,
    GpuRequirement,
    HostRequirements,
    LifecycleCommand,
    Mount,
)
from devyard.devcontainer.errors import ConfigError

__all__ = ["CONTAINER_HOOKS", "LABEL", "MergedConfig", "config_entry", "merge", "parse_label"]

#: The image label that holds the metadata.
LABEL: Final = "devcontainer.metadata"
#: The hooks that run in the container, in order (``initializeCommand`` runs on the host: devcontainer.json only).
CONTAINER_HOOKS: Final = (
    "onCreateCommand",
    "updateContentCommand",
    "postCreateCommand",
    "postStartCommand",
    "postAttachCommand",
)


@dataclass(frozen=True)
class MergedConfig:
    """What the container is made with, once the image's, the Features' and devcontainer.json's metadata are
    merged; unset properties have the spec's defaults."""

    init: bool = False
    privileged: bool = False
    cap_add: tuple[str, ...] = ()
    security_opt: tuple[str, ...] = ()
    entrypoints: tuple[str, ...] = ()
    mounts: tuple[Mount, ...] = ()
    #: Per hook of ``CONTAINER_HOOKS`` that has any: its commands, the image's first, devcontainer.json's last.
    hooks: Mapping[str, tuple[LifecycleCommand, ...]] = field(default_factory=dict)
    container_env: Mapping[str, str] = field(default_factory=dict)
    #: ``None``: the variable is unset for the remote user.
    remote_env: Mapping[str, str | None] = field(default_factory=dict)
    container_user: str | None = None
    remote_user: str | None = None
    user_env_probe: str = "loginInteractiveShell"
    update_remote_user_uid: bool = True
    override_command: bool = True
    shutdown_action: str = "stopContainer"
    wait_for: str = "updateContentCommand"
    forward_ports: tuple[ForwardPort, ...] = ()
    ports_attributes: Mapping[str, Any] = field(default_factory=dict)
    other_ports_attributes: Mapping[str, Any] | None = None
    host_requirements: HostRequirements | None = None
    #: ``--gpus`` of devcontainer.json's runArgs.
    gpus: str | None = None
    customizations: tuple[Mapping[str, Any], ...] = ()


def parse_label(text: str, *, source: str = f"the image's {LABEL} label") -> list[dict[str, Any]]:
    """The entries of a ``devcontainer.metadata`` label: a JSON array of objects, or one object. Raises
    ``ConfigError`` (naming ``source``) for anything else."""
    value = jsonc.parse(text, source=source)
    entries = value if isinstance(value, list) else [value]
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(source, None, None, f"entry {index} is not an object")
    return list(entries)


def config_entry(config: DevContainerConfig) -> dict[str, Any]:
    """devcontainer.json as a metadata entry, its runArgs folded in (they are passed after devcontainer.json's
    own properties, so they win): what ``merge`` puts last."""
    run_args = config.run_args
    entry: dict[str, Any] = {
        "id": "devcontainer.json",
        "containerEnv": {**config.container_env, **run_args.env},
        "remoteEnv": dict(config.remote_env),
        "mounts": list(config.mounts),
        "forwardPorts": [str(port) for port in config.forward_ports],
        "portsAttributes": dict(config.ports_attributes),
        "capAdd": [*config.cap_add, *run_args.cap_add],
        "securityOpt": [*config.security_opt, *run_args.security_opt],
    }
    optional = {
        "init": run_args.init if run_args.init is not None else config.init,
        "privileged": run_args.privileged if run_args.privileged is not None else config.privileged,
        "containerUser": config.container_user,
        "remoteUser": config.remote_user,
        "userEnvProbe": config.user_env_probe,
        "updateRemoteUserUID": config.update_remote_user_uid,
        "overrideCommand": config.override_command,
        "shutdownAction": config.shutdown_action,
        "waitFor": config.wait_for,
        "otherPortsAttributes": config.other_ports_attributes,
        "hostRequirements": config.host_requirements,
        "customizations": config.customizations or None,
    }
    entry.update({key: value for key, value in optional.items() if value is not None})
    for hook in CONTAINER_HOOKS:
        if hook in config.hooks:
            entry[hook] = config.hooks[hook]
    return entry


def merge(
    image_entries: Sequence[Mapping[str, Any]],
    feature_entries: Sequence[Mapping[str, Any]] = (),
    config: DevContainerConfig | None = None,
) -> MergedConfig:
    """The merge of the image label's entries, then the Features' (in install order), then devcontainer.json's.
    Entries are label-shaped dicts; an ``id`` in one names it in lifecycle commands' origin. Raises
    ``ConfigError`` for an entry property of the wrong shape."""
    entries: list[tuple[str, Mapping[str, Any]]] = [
        *((str(entry.get("id", "image")), entry) for entry in image_entries),
        *((str(entry.get("id", "feature")), entry) for entry in feature_entries),
    ]
    if config is not None:
        entries.append(("devcontainer.json", config_entry(config)))
    return _Merge().of(entries, config)


class _Merge:
    def __init__(self) -> None:
        self.init = False
        self.privileged = False
        self.cap_add: dict[str, None] = {}
        self.security_opt: dict[str, None] = {}
        self.entrypoints: list[str] = []
        self.mounts: dict[str, Mount] = {}
        self.hooks: dict[str, list[LifecycleCommand]] = {}
        self.container_env: dict[str, str] = {}
        self.remote_env: dict[str, str | None] = {}
        self.last: dict[str, Any] = {}
        self.forward_ports: dict[str, ForwardPort] = {}
        self.ports_attributes: dict[str, Any] = {}
        self.host_requirements: HostRequirements | None = None
        self.customizations: list[Mapping[str, Any]] = []

    def of(self, entries: list[tuple[str, Mapping[str, Any]]], config: DevContainerConfig | None) -> MergedConfig:
        for origin, entry in entries:
            try:
                self.add(origin, entry)
            except (ValueError, TypeError, AttributeError) as exc:
                raise ConfigError(f"the metadata of {origin}", None, None, str(exc)) from None
        last = self.last
        return MergedConfig(
            init=self.init,
            privileged=self.privileged,
            cap_add=tuple(self.cap_add),
            security_opt=tuple(self.security_opt),
            entrypoints=tuple(self.entrypoints),
            mounts=tuple(self.mounts.values()),
            hooks={hook: tuple(self.hooks[hook]) for hook in CONTAINER_HOOKS if hook in self.hooks},
            container_env=self.container_env,
            remote_env=self.remote_env,
            container_user=last.get("containerUser"),
            remote_user=last.get("remoteUser"),
            user_env_probe=last.get("userEnvProbe", "loginInteractiveShell"),
            update_remote_user_uid=last.get("updateRemoteUserUID", True),
            override_command=last.get("overrideCommand", True),
            shutdown_action=last.get("shutdownAction", "stopContainer"),
            wait_for=last.get("waitFor", "updateContentCommand"),
            forward_ports=tuple(self.forward_ports.values()),
            ports_attributes=self.ports_attributes,
            other_ports_attributes=last.get("otherPortsAttributes"),
            host_requirements=self.host_requirements,
            gpus=config.run_args.gpus if config is not None else None,
            customizations=tuple(self.customizations),
        )

    def add(self, origin: str, entry: Mapping[str, Any]) -> None:
        self.init = self.init or _boolean(entry, "init")
        self.privileged = self.privileged or _boolean(entry, "privileged")
        for name in _strings(entry, "capAdd"):
            self.cap_add[name.upper()] = None
        for name in _strings(entry, "securityOpt"):
            self.security_opt[name] = None
        if isinstance(entry.get("entrypoint"), str):
            self.entrypoints.append(entry["entrypoint"])
        for value in entry.get("mounts") or ():
            mount = value if isinstance(value, Mount) else config_module.parse_mount(value)
            # The last one per target wins, in the place of the last one.
            self.mounts.pop(mount.target, None)
            self.mounts[mount.target] = mount
        for hook in CONTAINER_HOOKS:
            value = entry.get(hook)
            command = (
                value if isinstance(value, LifecycleCommand) else config_module.lifecycle_command(value, origin=origin)
            )
            if command is not None:
                self.hooks.setdefault(hook, []).append(command)
        self.container_env.update(_mapping(entry, "containerEnv"))
        self.remote_env.update(_mapping(entry, "remoteEnv"))
        for key in (
            "containerUser",
            "remoteUser",
            "userEnvProbe",
            "updateRemoteUserUID",
            "overrideCommand",
            "shutdownAction",
            "waitFor",
            "otherPortsAttributes",
        ):
            if entry.get(key) is not None:
                self.last[key] = entry[key]
        for value in entry.get("forwardPorts") or ():
            port = config_module.parse_forward_port(value)
            self.forward_ports.setdefault(str(port), port)
        self.ports_attributes.update(_mapping(entry, "portsAttributes"))
        requirements = entry.get("hostRequirements")
        if isinstance(requirements, Mapping):
            requirements = config_module.parse_host_requirements(requirements)
        if isinstance(requirements, HostRequirements):
            self.host_requirements = _maximum(self.host_requirements, requirements)
        if isinstance(entry.get("customizations"), Mapping) and entry["customizations"]:
            self.customizations.append(entry["customizations"])


def _boolean(entry: Mapping[str, Any], key: str) -> bool:
    value = entry.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, found {json.dumps(value)}")
    return bool(value)


def _strings(entry: Mapping[str, Any], key: str) -> list[str]:
    value = entry.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{key}: expected an array of strings")
    return value


def _mapping(entry: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = entry.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}: expected an object")
    return dict(value)


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


_GPU_ORDER: Final[dict[object, int]] = {False: 0, "optional": 1, True: 2}


def _maximum(a: HostRequirements | None, b: HostRequirements) -> HostRequirements:
    if a is None:
        return b
    gpu = a.gpu or b.gpu
    if a.gpu is not None and b.gpu is not None:
        required = max(a.gpu.required, b.gpu.required, key=lambda value: _GPU_ORDER[value])
        gpu = GpuRequirement(required, _larger(a.gpu.cores, b.gpu.cores), _larger(a.gpu.memory, b.gpu.memory))
    return HostRequirements(
        cpus=_larger(a.cpus, b.cpus),
        memory=_larger(a.memory, b.memory),
        storage=_larger(a.storage, b.storage),
        gpu=gpu,
    )
