"""Variables in devcontainer.json string values, replaced as the Dev Containers CLI does.

Two passes. When the config is loaded (``config.load`` calls ``substitute``): ``${localWorkspaceFolder}``,
``${localWorkspaceFolderBasename}``, ``${containerWorkspaceFolder}``, ``${containerWorkspaceFolderBasename}``,
``${localEnv:NAME}``, ``${localEnv:NAME:default}`` and ``${devcontainerId}``. Once the container runs and its
environment is known (the runner calls ``substitute_container_env``): ``${containerEnv:NAME}`` and
``${containerEnv:NAME:default}``. A variable that is missing from the environment, without a default, becomes the
empty string (as in the CLI).

Left as written: variables of other tools (``${workspaceFolder}`` is VS Code's), unknown ones, ``${containerEnv:...}``
in the first pass, and anything after ``$$`` (``$${severity}`` is a literal for the program that reads it).
Values are substituted, never keys.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoadContext", "devcontainer_id", "substitute", "substitute_container_env"]

_VARIABLE = re.compile(r"(\$?)\$\{([^{}]*)\}")
_DIGITS = "0123456789abcdefghijklmnopqrstuv"


@dataclass(frozen=True)
class LoadContext:
    """What the first pass knows: where the workspace is on the host and in the container, the host's
    environment (the runner decides which of it a config may read), and the dev container's id."""

    local_workspace_folder: str
    container_workspace_folder: str | None = None
    local_env: Mapping[str, str] = field(default_factory=dict)
    devcontainer_id: str | None = None


def devcontainer_id(inputs: Mapping[str, str]) -> str:
    """A stable id for a dev container, from what identifies it (e.g. ``{"devyard.environment": ID}``): the same
    inputs give the same id across rebuilds. 52 characters of ``[0-9a-v]``, as the CLI's ids (a SHA-256 of the
    sorted inputs, in base 32)."""
    digest = hashlib.sha256(json.dumps(dict(sorted(inputs.items())), separators=(",", ":")).encode()).digest()
    number = int.from_bytes(digest, "big")
    text = ""
    while number:
        number, digit = divmod(number, 32)
        text = _DIGITS[digit] + text
    return text.rjust(52, "0")


def substitute(value: Any, context: LoadContext) -> Any:
    """``value`` (a parsed config or any part of it) with the load-time variables replaced in every string."""

    def replace(kind: str, argument: str | None) -> str | None:
        if kind == "localWorkspaceFolder" and argument is None:
            return context.local_workspace_folder
        if kind == "localWorkspaceFolderBasename" and argument is None:
            return posixpath.basename(context.local_workspace_folder.rstrip("/"))
        if kind == "containerWorkspaceFolder" and argument is None:
            return context.container_workspace_folder
        if kind == "containerWorkspaceFolderBasename" and argument is None:
            folder = context.container_workspace_folder
            return None if folder is None else posixpath.basename(folder.rstrip("/"))
        if kind == "devcontainerId" and argument is None:
            return context.devcontainer_id
        if kind in ("localEnv", "env") and argument is not None:  # env: the older name the CLI still reads
            return _from_env(context.local_env, argument)
        return None

    return _walk(value, replace)


def substitute_container_env(value: Any, container_env: Mapping[str, str]) -> Any:
    """``value`` with ``${containerEnv:NAME}`` and ``${containerEnv:NAME:default}`` replaced from the running
    container's environment ``container_env``; everything else as it was."""

    def replace(kind: str, argument: str | None) -> str | None:
        if kind == "containerEnv" and argument is not None:
            return _from_env(container_env, argument)
        return None

    return _walk(value, replace)


def _from_env(env: Mapping[str, str], argument: str) -> str:
    name, _, default = argument.partition(":")
    return env.get(name, default)


def _walk(value: Any, replace: Callable[[str, str | None], str | None]) -> Any:
    if isinstance(value, str):
        return _substitute_string(value, replace)
    if isinstance(value, list):
        return [_walk(item, replace) for item in value]
    if isinstance(value, dict):
        return {key: _walk(item, replace) for key, item in value.items()}
    return value


def _substitute_string(text: str, replace: Callable[[str, str | None], str | None]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(1):
            return match.group(0)
        kind, colon, argument = match.group(2).partition(":")
        found = replace(kind, argument if colon else None)
        return match.group(0) if found is None else found

    return _VARIABLE.sub(one, text)
