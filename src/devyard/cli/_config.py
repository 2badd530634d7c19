"""The CLI's config file: named profiles of a server URL and a token, and which profile is current.

``$XDG_CONFIG_HOME/devyard/config.json`` (default ``~/.config/devyard/config.json``), mode 0600 because it
holds credentials. ``devyard login`` and ``devyard up`` write it; every API command reads it, after the
``--server``/``--token`` flags and the ``DEVYARD_SERVER``/``DEVYARD_TOKEN`` variables.

    {"current_profile": "default", "profiles": {"default": {"server": "https://...", "token": "..."}}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["DEFAULT_PROFILE", "Config", "Profile", "config_path", "load", "save"]

DEFAULT_PROFILE = "default"


@dataclass(frozen=True)
class Profile:
    server: str | None = None
    token: str | None = None


@dataclass
class Config:
    current_profile: str | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)


def config_path() -> Path:
    from pathlib import Path

    return Path(_default_location())


def _default_location() -> str:
    """``config_path`` without pathlib, which every API command would import only to read the file."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "devyard", "config.json")


def load(path: Path | None = None) -> Config:
    """The config file's content; an empty config when there is no file."""
    location = str(path) if path is not None else _default_location()
    try:
        with open(location, encoding="utf-8") as stream:
            raw = json.loads(stream.read())
    except FileNotFoundError:
        return Config()
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read the config file {location}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("profiles", {}), dict):
        raise click.ClickException(f"the config file {location} is not a devyard config (expected a JSON object)")
    profiles = {}
    for name, entry in raw.get("profiles", {}).items():
        if not isinstance(entry, dict):
            raise click.ClickException(f"the config file {location}: profile {name!r} is not an object")
        profiles[str(name)] = Profile(server=_str_or_none(entry.get("server")), token=_str_or_none(entry.get("token")))
    return Config(current_profile=_str_or_none(raw.get("current_profile")), profiles=profiles)


def save(config: Config, path: Path | None = None) -> Path:
    """Write the config atomically, readable only by its owner."""
    path = path or config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    document = {
        "current_profile": config.current_profile,
        "profiles": {
            name: {key: value for key, value in (("server", p.server), ("token", p.token)) if value is not None}
            for name, p in config.profiles.items()
        },
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w") as stream:
            json.dump(document, stream, indent=2)
            stream.write("\n")
        os.chmod(temporary, 0o600)  # O_CREAT's mode does not apply to a file left over from a crash
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
