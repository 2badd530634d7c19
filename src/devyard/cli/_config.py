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
from pathlib import Path

import click

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
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "devyard" / "config.json"


def load(path: Path | None = None) -> Config:
    """The config file's content; an empty config when there is no file."""
    path = path or config_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read the config file {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("profiles", {}), dict):
        raise click.ClickException(f"the config file {path} is not a devyard config (expected a JSON object)")
    profiles = {}
    for name, entry in raw.get("profiles", {}).items():
        if not isinstance(entry, dict):
            raise click.ClickException(f"the config file {path}: profile {name!r} is not an object")
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
