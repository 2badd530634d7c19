"""Dev Container Features: a config's ``features`` turned into an ordered install plan and a build context.

Called by the runner when it builds an environment's image: it parses the references (``parse_user_features``),
lets ``resolve_features`` fetch what they name through a ``FeatureSource`` (the runner's, in
``runner/features.py``; ``LocalFeatureSource`` here reads local folders in place), reads each
``devcontainer-feature.json`` (JSONC, checked against the official schema), resolves the options, follows
``dependsOn`` and orders the result with the spec's round-based algorithm
(https://containers.dev/implementors/features/#installation-order). ``metadata_entry`` gives what a Feature adds
to the container, shaped like a ``devcontainer.metadata`` label entry; ``write_build_context`` writes the
Dockerfile and files that install the Features on a base image.

Pitfalls:
- Feature equality is the spec's: the same content (manifest digest, tarball digest, or local folder) run with
  the same options. Options are compared after defaults are filled in, so ``{}`` and the defaults spelled out
  are one Feature, installed once.
- Local Features must sit inside the project's ``.devcontainer`` folder, by path and after symlinks.
- Legacy (v1) ids are refused with the modern id to use; nothing here guesses a registry.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
import os
import posixpath
import re
import shutil
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Protocol

import jsonschema

from devyard.devcontainer import jsonc
from devyard.devcontainer.errors import ConfigError

__all__ = [
    "DEFINITION_FILE",
    "FEATURE_LAYER_MEDIA_TYPE",
    "LIFECYCLE_HOOKS",
    "FeatureDefinition",
    "FeatureOption",
    "FeatureReference",
    "FeatureSource",
    "FetchedFeature",
    "LocalFeatureSource",
    "LocalReference",
    "Location",
    "OciReference",
    "OptionValue",
    "ResolvedFeature",
    "TarballReference",
    "UserFeature",
    "checked_local_folder",
    "feature_env",
    "load_definition",
    "metadata_entry",
    "option_env_name",
    "parse_feature_reference",
    "parse_user_features",
    "resolve_features",
    "resolve_options",
    "write_build_context",
]

#: The media type of the one layer of a Feature published to an OCI registry.
FEATURE_LAYER_MEDIA_TYPE = "application/vnd.devcontainers.layer.v1+tar"
#: The lifecycle hooks a Feature may contribute, in the order they run.
LIFECYCLE_HOOKS = (
    "onCreateCommand",
    "updateContentCommand",
    "postCreateCommand",
    "postStartCommand",
    "postAttachCommand",
)
#: What a Feature's metadata contributes to the container, besides its id and hooks.
_CONTRIBUTED = ("containerEnv", "mounts", "capAdd", "securityOpt", "privileged", "init", "entrypoint", "customizations")
DEFINITION_FILE = "devcontainer-feature.json"
_ENV_FILE = "devcontainer-features.env"

OptionValue = str | bool

# The Features the first (v1) format named by a bare id, and what replaced them under ghcr.io/devcontainers/features.
_V1_OFFICIAL = frozenset(
    {
        "aws-cli",
        "azure-cli",
        "desktop-lite",
        "docker-in-docker",
        "dotnet",
        "git",
        "git-lfs",
        "github-cli",
        "java",
        "kubectl-helm-minikube",
        "node",
        "powershell",
        "python",
        "ruby",
        "rust",
        "sshd",
        "terraform",
    }
)
_V1_RENAMED = {
    "common": ("common-utils", ""),
    "golang": ("go", ""),
    "docker-from-docker": ("docker-outside-of-docker", ""),
    "gradle": ("java", ', with the option "installGradle": true'),
    "maven": ("java", ', with the option "installMaven": true'),
    "jupyterlab": ("python", ', with the option "installJupyterlab": true'),
}
_OFFICIAL_NAMESPACE = "ghcr.io/devcontainers/features"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_HOST = re.compile(r"(?:[a-zA-Z0-9.-]+|\[[0-9a-fA-F:]+\])(?::[0-9]+)?\Z")
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}\Z")
_TARBALL_NAME = re.compile(r"devcontainer-feature-(.+)\.tgz\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _error(source: str | Path, message: str) -> ConfigError:
    return ConfigError(str(source), None, None, message)


@dataclass(frozen=True)
class Location:
    """Where something is written: a file, the positions of its values (from ``jsonc.parse_with_positions``;
    ``None`` when unknown) and the path of the thing inside it. Errors about it point at its line and column."""

    source: str
    positions: jsonc.Positions | None = field(default=None, compare=False, repr=False)
    path: jsonc.JsonPath = ()

    def error(self, message: str, *below: str | int, key: bool = False) -> ConfigError:
        """A ``ConfigError`` at the value ``below`` this location (at its property name with ``key``)."""
        if self.positions is None:
            return ConfigError(self.source, None, None, message)
        path = (*self.path, *below)
        found = self.positions.key_at(path) if key else self.positions.at(path)
        line, column = found or self.positions.nearest(path)
        return ConfigError(self.source, line, column, message)


# --- references --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OciReference:
    """``REGISTRY/NAMESPACE/ID[:TAG][@sha256:...]``, the namespace and id lowercased as the spec asks."""

    registry: str
    namespace: str
    feature_id: str
    tag: str = "latest"
    digest: str = ""
    #: How the config spelled it.
    text: str = ""
    kind: Literal["oci"] = "oci"

    @property
    def resource(self) -> str:
        """The id without tag or digest: what ``installsAfter`` and ``overrideFeatureInstallOrder`` name."""
        return f"{self.registry}/{self.namespace}/{self.feature_id}"

    @property
    def image_reference(self) -> str:
        """The reference an OCI registry client pulls: the digest when there is one, else the tag."""
        return f"{self.resource}@{self.digest}" if self.digest else f"{self.resource}:{self.tag}"

    def __str__(self) -> str:
        return self.text or self.image_reference


@dataclass(frozen=True)
class TarballReference:
    """An ``https://`` URL of a Feature tarball (``devcontainer-feature-ID.tgz``); ``http://`` only on loopback."""

    url: str
    #: The id its file name gives, or empty.
    feature_id: str = ""
    kind: Literal["tarball"] = "tarball"

    @property
    def resource(self) -> str:
        return self.url

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class LocalReference:
    """``./PATH``: a folder inside the project's ``.devcontainer`` folder, relative to the devcontainer.json."""

    #: How the config spelled it.
    path: str
    #: The folder it names (absolute, lexically normalized).
    folder: Path
    #: The ``.devcontainer`` folder it must stay inside.
    boundary: Path
    kind: Literal["local"] = "local"

    @property
    def feature_id(self) -> str:
        return self.folder.name

    @property
    def resource(self) -> str:
        return str(self.folder)

    def __str__(self) -> str:
        return self.path


FeatureReference = OciReference | TarballReference | LocalReference


def _legacy_message(text: str) -> str | None:
    """Why ``text`` is a v1 reference and what to write instead, or ``None`` when it is not one."""
    bare = text.split("@", 1)[0]
    if bare.rfind(":") > bare.rfind("/"):
        bare = bare.rpartition(":")[0]
    if "/" not in bare:
        if bare in _V1_OFFICIAL:
            return f'the v1 Feature id {text!r} is no longer supported: use "{_OFFICIAL_NAMESPACE}/{bare}:1"'
        if bare in _V1_RENAMED:
            modern, note = _V1_RENAMED[bare]
            return f'the v1 Feature id {text!r} is no longer supported: use "{_OFFICIAL_NAMESPACE}/{modern}:1"{note}'
        return (
            f"{text!r} is not a Feature reference: write REGISTRY/NAMESPACE/ID[:TAG] (an OCI Feature), "
            "https://.../devcontainer-feature-ID.tgz or ./PATH (a folder in .devcontainer)"
        )
    first = bare.split("/", 1)[0]
    if "." in first or ":" in first or first == "localhost":
        return None
    parts = bare.split("/")
    if parts[:2] == ["devcontainers", "features"] and len(parts) == 3:
        return (
            f"{text!r} is a v1 Feature reference (a GitHub release), which is no longer supported: use "
            f'"{_OFFICIAL_NAMESPACE}/{parts[2]}:1"'
        )
    return (
        f"{text!r} is a v1 Feature reference (OWNER/REPO/ID, a GitHub release), which is no longer supported: "
        "use the Feature's OCI id (REGISTRY/NAMESPACE/ID[:TAG], for example ghcr.io/OWNER/REPO/ID:1)"
    )


def _on_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _dev_container_folder(config_file: Path) -> Path:
    """The project's ``.devcontainer`` folder: the config's own folder or an ancestor of that name, else
    ``.devcontainer`` beside a ``.devcontainer.json``."""
    folder = Path(os.path.abspath(config_file)).parent
    for candidate in (folder, *folder.parents):
        if candidate.name == ".devcontainer":
            return candidate
    return folder / ".devcontainer"


def parse_feature_reference(text: str, *, config_file: Path, where: str = "features") -> FeatureReference:
    """Parse one Feature reference as written in ``config_file`` (``where`` says in which property, for
    messages). Raises ``ConfigError`` naming the file and what to write instead."""
    source = str(config_file)
    if not isinstance(text, str) or not text or text != text.strip():
        raise _error(source, f"{where}: {text!r} is not a Feature reference (empty or surrounded by whitespace)")
    if text.startswith(("./", "../")) or text in (".", ".."):
        return _parse_local(text, config_file, where)
    if text.startswith("/"):
        raise _error(
            source,
            f"{where}: the local Feature {text!r} is an absolute path; give it relative to the devcontainer.json",
        )
    if "://" in text:
        return _parse_tarball(text, source, where)
    legacy = _legacy_message(text)
    if legacy is not None:
        raise _error(source, f"{where}: {legacy}")
    return _parse_oci(text, source, where)


def _parse_local(text: str, config_file: Path, where: str) -> LocalReference:
    source = str(config_file)
    base = Path(os.path.abspath(config_file)).parent
    folder = Path(posixpath.normpath(posixpath.join(base.as_posix(), text)))
    boundary = _dev_container_folder(config_file)
    if boundary not in folder.parents:
        raise _error(
            source,
            f"{where}: the local Feature {text!r} is not inside the project's .devcontainer folder ({boundary}); "
            "local Features must be sub-folders of it",
        )
    return LocalReference(path=text, folder=folder, boundary=boundary)


def _parse_tarball(text: str, source: str, where: str) -> TarballReference:
    parts = urllib.parse.urlsplit(text)
    host = parts.hostname or ""
    if parts.scheme == "http" and host and _on_loopback(host):
        pass
    elif parts.scheme != "https" or not host:
        raise _error(
            source, f"{where}: the Feature URL {text!r} must be https:// (a tarball, devcontainer-feature-ID.tgz)"
        )
    name = posixpath.basename(parts.path)
    match = _TARBALL_NAME.match(name)
    return TarballReference(url=text, feature_id=match[1].lower() if match else "")


def _parse_oci(text: str, source: str, where: str) -> OciReference:
    rest, digest = text, ""
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not _DIGEST.match(digest):
            raise _error(source, f"{where}: in {text!r} the digest must be sha256: and 64 lowercase hex digits")
    tag = ""
    if rest.rfind(":") > rest.rfind("/"):
        rest, _, tag = rest.rpartition(":")
        if not _TAG.match(tag):
            raise _error(source, f"{where}: in {text!r} the tag {tag!r} is not a valid tag")
    registry, *components = rest.split("/")
    if not _HOST.match(registry):
        raise _error(source, f"{where}: in {text!r} {registry!r} is not a registry host")
    lowered = [component.lower() for component in components]
    if len(lowered) < 2 or not all(_COMPONENT.match(component) for component in lowered):
        raise _error(
            source,
            f"{where}: {text!r} is not an OCI Feature reference: write REGISTRY/NAMESPACE/ID[:TAG] with lowercase "
            "letters, digits, '.', '_' or '-' in the namespace and id",
        )
    return OciReference(
        registry=registry.lower(),
        namespace="/".join(lowered[:-1]),
        feature_id=lowered[-1],
        tag=tag or ("" if digest else "latest"),
        digest=digest,
        text=text,
    )


def _resource_of(text: str, *, config_file: Path, where: str) -> str:
    """The version-less id ``text`` names (for ``installsAfter`` and ``overrideFeatureInstallOrder``, which may
    not pin a version: a tag or digest given anyway is ignored)."""
    return parse_feature_reference(text, config_file=config_file, where=where).resource


@dataclass(frozen=True)
class UserFeature:
    """One entry of a ``features`` object (or of a Feature's ``dependsOn``): a reference and its options."""

    reference: FeatureReference
    options: Mapping[str, OptionValue]
    #: Where the entry's value is written.
    location: Location = field(default=Location(""), compare=False)


def _options_of(value: Any, text: str, location: Location, where: str) -> dict[str, OptionValue]:
    if isinstance(value, str):
        # The spec's shorthand: a string is the "version" option.
        return {"version": value}
    if not isinstance(value, dict):
        raise location.error(
            f"{where}: the value of {text!r} must be an object of options or a version string, not {value!r}"
        )
    options: dict[str, OptionValue] = {}
    for name, option in value.items():
        if not isinstance(option, str | bool):
            raise location.error(
                f"{where}: the option {name!r} of {text!r} is {json.dumps(option)}; option values are strings or "
                f"booleans (write {json.dumps(str(option))}?)",
                name,
            )
        options[name] = option
    return options


def parse_user_features(
    features: Mapping[str, Any], *, config_file: Path, where: str = "features", location: Location | None = None
) -> list[UserFeature]:
    """The references and options of a ``features`` object, in the order written. ``location`` is where the
    object is written (default: ``config_file``'s ``features``, without positions)."""
    within = location or Location(str(config_file), None, ("features",))
    if not isinstance(features, Mapping):
        raise within.error(f"{where} must be an object mapping Feature references to options")
    parsed = []
    for text, value in features.items():
        entry = Location(within.source, within.positions, (*within.path, text))
        try:
            reference = parse_feature_reference(text, config_file=config_file, where=where)
        except ConfigError as exc:
            raise entry.error(exc.message, key=True) from None
        parsed.append(UserFeature(reference, _options_of(value, text, entry, where), entry))
    return parsed


# --- devcontainer-feature.json ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureOption:
    """One option a Feature declares."""

    type: Literal["boolean", "string"]
    default: OptionValue
    enum: tuple[str, ...] = ()
    proposals: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class FeatureDefinition:
    """A ``devcontainer-feature.json``, validated."""

    id: str
    version: str
    options: Mapping[str, FeatureOption]
    #: Hard dependencies, as written (references to options).
    depends_on: Mapping[str, Any]
    #: Soft dependencies: version-less ids.
    installs_after: tuple[str, ...]
    legacy_ids: tuple[str, ...]
    #: The whole document, for what it contributes to the container.
    data: Mapping[str, Any] = field(repr=False)
    #: The file it was read from.
    source: str = ""
    #: Where its values are in that file.
    positions: jsonc.Positions | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return str(self.data.get("name") or self.id)


@cache
def _feature_schema() -> dict[str, Any]:
    resource = importlib.resources.files("devyard.devcontainer") / "schemas" / "devContainerFeature.schema.json"
    loaded: dict[str, Any] = json.loads(resource.read_text(encoding="utf-8"))
    return loaded


def _deepest_path(error: jsonschema.ValidationError) -> list[str | int]:
    best = jsonschema.exceptions.best_match([error])
    return list(best.absolute_path)


def _schema_messages(error: jsonschema.ValidationError) -> list[str]:
    # The schema wraps the whole document in a one-branch "oneOf": its failure says nothing by itself, the
    # branch's errors do. Other alternatives (an option is boolean or string) are best told by the closest one.
    alternatives = error.validator_value
    if error.validator == "oneOf" and isinstance(alternatives, list) and len(alternatives) == 1 and error.context:
        return [message for cause in error.context for message in _schema_messages(cause)]
    best = jsonschema.exceptions.best_match([error])
    location = "/".join(str(part) for part in best.absolute_path) or "(top level)"
    return [f"{location}: {best.message}"]


def load_definition(folder: Path, *, name: str = "") -> FeatureDefinition:
    """Read and validate ``folder/devcontainer-feature.json`` (JSONC). ``name`` is how the config refers to
    the Feature, for messages. Raises ``ConfigError`` with the file's path."""
    path = folder / DEFINITION_FILE
    label = f"the Feature {name}" if name else "the Feature"
    if path.is_symlink() or not path.is_file():
        raise _error(path, f"{label} has no {DEFINITION_FILE} (a regular file) in {folder}")
    data, positions = jsonc.parse_with_positions(path.read_text(encoding="utf-8"), source=str(path))
    if not isinstance(data, dict):
        raise ConfigError(str(path), 1, 1, f"{DEFINITION_FILE} must hold an object")
    validator = jsonschema.Draft7Validator(_feature_schema())
    problems = sorted(validator.iter_errors(data), key=lambda error: [str(part) for part in error.absolute_path])
    if problems:
        messages = [message for problem in problems for message in _schema_messages(problem)]
        # The first problem's place; the message names every one.
        line, column = positions.nearest(_deepest_path(problems[0]))
        raise ConfigError(str(path), line, column, f"{label} is not valid: " + "; ".join(messages))
    options = {
        option_id: FeatureOption(
            type=spec["type"],
            default=spec["default"],
            enum=tuple(spec.get("enum", ())),
            proposals=tuple(spec.get("proposals", ())),
            description=str(spec.get("description", "")),
        )
        for option_id, spec in data.get("options", {}).items()
    }
    return FeatureDefinition(
        id=data["id"],
        version=data["version"],
        options=options,
        depends_on=dict(data.get("dependsOn", {})),
        installs_after=tuple(data.get("installsAfter", ())),
        legacy_ids=tuple(data.get("legacyIds", ())),
        data=data,
        source=str(path),
        positions=positions,
    )


def option_env_name(option_id: str) -> str:
    """The environment variable an option becomes, as the spec computes it: non-word characters to ``_``, a
    leading run of digits and underscores to one ``_``, upper-cased."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", option_id)
    name = re.sub(r"^[0-9_]+", "_", name)
    return name.upper()


def resolve_options(
    definition: FeatureDefinition, given: Mapping[str, OptionValue], *, name: str, location: Location
) -> dict[str, OptionValue]:
    """The options a Feature runs with: ``given`` over its defaults, each checked against its declaration.
    ``location`` is where ``given`` is written (errors point at the option)."""
    resolved = {option_id: option.default for option_id, option in definition.options.items()}
    for option_id, value in given.items():
        option = definition.options.get(option_id)
        if option is None:
            known = ", ".join(sorted(definition.options)) or "none"
            raise location.error(f"the Feature {name} has no option {option_id!r} (its options: {known})", option_id)
        if option.type == "boolean" and not isinstance(value, bool):
            raise location.error(
                f"the option {option_id!r} of the Feature {name} is a boolean: write true or false, not {value!r}",
                option_id,
            )
        if option.type == "string" and not isinstance(value, str):
            raise location.error(
                f"the option {option_id!r} of the Feature {name} is a string: write {json.dumps(str(value).lower())}, "
                f"not {json.dumps(value)}",
                option_id,
            )
        if option.enum and value not in option.enum:
            raise location.error(
                f"the option {option_id!r} of the Feature {name} must be one of {', '.join(option.enum)}; "
                f"not {value!r}",
                option_id,
            )
        resolved[option_id] = value
    return resolved


def _env_text(value: OptionValue) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else value


def feature_env(options: Mapping[str, OptionValue]) -> dict[str, str]:
    """The environment variables ``install.sh`` gets for ``options`` (booleans as ``true``/``false``)."""
    return {option_env_name(option_id): _env_text(value) for option_id, value in options.items()}


# --- fetching ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchedFeature:
    """A Feature's files on this host."""

    #: Holds ``devcontainer-feature.json`` and ``install.sh``.
    folder: Path
    #: What identifies its content: the manifest digest of an OCI Feature, the tarball's ``sha256:``, the
    #: tree's digest for a local copy; empty when read in place.
    digest: str


class FeatureSource(Protocol):
    """Brings a Feature's files to this host (``runner.features.FeatureCache`` fetches all three kinds)."""

    async def fetch(self, reference: FeatureReference) -> FetchedFeature: ...


class LocalFeatureSource:
    """Reads local Features in place, after checking that symlinks keep them inside ``.devcontainer``; refuses
    other references (a check of a config that must not touch the network)."""

    async def fetch(self, reference: FeatureReference) -> FetchedFeature:
        if not isinstance(reference, LocalReference):
            raise _error(str(reference), f"the Feature {reference} is not local, and this check fetches nothing")
        return FetchedFeature(folder=checked_local_folder(reference), digest="")


def checked_local_folder(reference: LocalReference) -> Path:
    """The real folder a local reference names, refused when it is missing or leaves ``.devcontainer``."""
    real = Path(os.path.realpath(reference.folder))
    boundary = Path(os.path.realpath(reference.boundary))
    if boundary not in real.parents:
        raise _error(
            reference.folder,
            f"the local Feature {reference.path} resolves (through a symlink) to {real}, outside the project's "
            ".devcontainer folder",
        )
    if not real.is_dir():
        raise _error(reference.folder, f"the local Feature {reference.path} is not a folder ({reference.folder})")
    return real


# --- resolution and install order -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedFeature:
    """A Feature to install: where it came from, its definition, its files and the options it runs with."""

    reference: FeatureReference
    #: The options the config (or a ``dependsOn``) gave, as given.
    user_options: Mapping[str, OptionValue]
    #: ``user_options`` over the defaults.
    options: Mapping[str, OptionValue]
    definition: FeatureDefinition
    folder: Path
    digest: str

    @property
    def identity(self) -> tuple[str, str, str]:
        """The spec's Feature equality: same content, same options."""
        content = self.digest if self.reference.kind != "local" else self.reference.resource
        return (self.reference.kind, content, json.dumps(dict(self.options), sort_keys=True))

    @property
    def env(self) -> dict[str, str]:
        return feature_env(self.options)

    @property
    def aliases(self) -> frozenset[str]:
        """The version-less ids that name this Feature in ``installsAfter`` and ``overrideFeatureInstallOrder``,
        its legacy ids included."""
        names = {self.reference.resource}
        if isinstance(self.reference, OciReference):
            names.update(
                f"{self.reference.registry}/{self.reference.namespace}/{old}" for old in self.definition.legacy_ids
            )
        return frozenset(names)

    def describe(self) -> str:
        if self.user_options:
            return f"{self.reference} {json.dumps(dict(self.user_options), sort_keys=True)}"
        return str(self.reference)


async def resolve_features(
    features: Mapping[str, Any],
    *,
    config_file: Path,
    source: FeatureSource,
    override_order: Sequence[str] = (),
    positions: jsonc.Positions | None = None,
) -> list[ResolvedFeature]:
    """The Features of a config's ``features`` and everything they ``dependsOn``, in install order.

    ``override_order`` is the config's ``overrideFeatureInstallOrder``; ``positions``, those of the
    devcontainer.json's values (``jsonc.parse_with_positions``), place errors at their line and column. Raises
    ``ConfigError`` for a bad reference, option or definition, a cycle (naming the Features in it), or an
    override entry that names no Feature; what ``source`` raises (fetch failures) passes through.
    """
    config = Location(str(config_file), positions)
    graph = _Graph(config_file, source, config)
    for user in parse_user_features(
        features, config_file=config_file, location=Location(config.source, positions, ("features",))
    ):
        await graph.add(user)
    return graph.order(override_order)


class _Graph:
    """The accumulator of the spec's step 1: unique Features and their hard and soft edges."""

    def __init__(self, config_file: Path, source: FeatureSource, config: Location) -> None:
        self.config_file = config_file
        self.source = source
        self.config = config
        self.nodes: dict[tuple[str, str, str], ResolvedFeature] = {}
        self.hard: dict[tuple[str, str, str], list[tuple[str, str, str]]] = {}
        self.fetched: dict[FeatureReference, tuple[FetchedFeature, FeatureDefinition]] = {}

    async def _fetch(self, reference: FeatureReference) -> tuple[FetchedFeature, FeatureDefinition]:
        found = self.fetched.get(reference)
        if found is None:
            fetched = await self.source.fetch(reference)
            definition = load_definition(fetched.folder, name=str(reference))
            if isinstance(reference, LocalReference) and definition.id != reference.folder.name:
                raise Location(definition.source, definition.positions).error(
                    f"the local Feature {reference} has the id {definition.id!r}: a local Feature's folder must be "
                    "named after its id",
                    "id",
                )
            found = self.fetched[reference] = (fetched, definition)
        return found

    async def add(self, user: UserFeature) -> tuple[str, str, str]:
        fetched, definition = await self._fetch(user.reference)
        options = resolve_options(definition, user.options, name=str(user.reference), location=user.location)
        node = ResolvedFeature(user.reference, dict(user.options), options, definition, fetched.folder, fetched.digest)
        key = node.identity
        if key in self.nodes:
            return key
        # In the accumulator before its dependencies: a dependsOn cycle comes back here and stops.
        self.nodes[key] = node
        self.hard[key] = []
        where = f"dependsOn of the Feature {user.reference}"
        written = Location(definition.source, definition.positions, ("dependsOn",))
        for dependency in parse_user_features(
            definition.depends_on, config_file=self.config_file, where=where, location=written
        ):
            if isinstance(dependency.reference, LocalReference) and not isinstance(user.reference, LocalReference):
                raise dependency.location.error(
                    f"{where}: {dependency.reference} is a local Feature; only local Features may depend on those",
                    key=True,
                )
            self.hard[key].append(await self.add(dependency))
        return key

    def _matching(self, resource: str) -> list[tuple[str, str, str]]:
        return [key for key, node in self.nodes.items() if resource in node.aliases]

    def order(self, override_order: Sequence[str]) -> list[ResolvedFeature]:
        edges: dict[tuple[str, str, str], set[tuple[str, str, str]]] = {
            key: set(deps) for key, deps in self.hard.items()
        }
        for key, node in self.nodes.items():
            where = f"installsAfter of the Feature {node.reference}"
            for text in node.definition.installs_after:
                try:
                    resource = _resource_of(text, config_file=self.config_file, where=where)
                except ConfigError:
                    # A soft dependency on something that cannot be installed here is no dependency at all.
                    continue
                edges[key].update(other for other in self._matching(resource) if other != key)
        priority: dict[tuple[str, str, str], int] = dict.fromkeys(self.nodes, 0)
        where = "overrideFeatureInstallOrder"
        for index, text in enumerate(override_order):
            try:
                matched = self._matching(_resource_of(text, config_file=self.config_file, where=where))
            except ConfigError as exc:
                raise self.config.error(exc.message, where, index) from None
            if not matched:
                raise self.config.error(f"{where}: {text!r} names none of the Features to install", where, index)
            for key in matched:
                priority[key] = max(priority[key], len(override_order) - index)
        return _rounds(self.nodes, edges, priority, self.config)


def _tag_key(reference: FeatureReference) -> tuple[int, tuple[int, ...], str]:
    """Oldest tag first, ``latest`` last."""
    tag = reference.tag if isinstance(reference, OciReference) else ""
    if tag == "latest":
        return (2, (), tag)
    if re.fullmatch(r"\d+(?:\.\d+)*", tag):
        return (0, tuple(int(part) for part in tag.split(".")), tag)
    return (1, (), tag)


def _round_key(node: ResolvedFeature) -> tuple[Any, ...]:
    """The spec's round stable sort: resource name, tag, most user-given options first, their keys, their
    values, then the canonical name."""
    given = sorted(node.user_options.items())
    return (
        node.reference.resource,
        _tag_key(node.reference),
        -len(given),
        tuple(name for name, _ in given),
        tuple(_env_text(value) for _, value in given),
        f"{node.reference.resource}@{node.digest}",
    )


def _rounds(
    nodes: Mapping[tuple[str, str, str], ResolvedFeature],
    edges: Mapping[tuple[str, str, str], set[tuple[str, str, str]]],
    priority: Mapping[tuple[str, str, str], int],
    config: Location,
) -> list[ResolvedFeature]:
    installed: list[tuple[str, str, str]] = []
    done: set[tuple[str, str, str]] = set()
    worklist = list(nodes)
    while worklist:
        ready = [key for key in worklist if edges[key] <= done]
        if not ready:
            raise config.error(_cycle_message(nodes, edges, worklist), "features")
        top = max(priority[key] for key in ready)
        committed = sorted((key for key in ready if priority[key] == top), key=lambda key: _round_key(nodes[key]))
        installed.extend(committed)
        done.update(committed)
        worklist = [key for key in worklist if key not in done]
    return [nodes[key] for key in installed]


def _cycle_message(
    nodes: Mapping[tuple[str, str, str], ResolvedFeature],
    edges: Mapping[tuple[str, str, str], set[tuple[str, str, str]]],
    remaining: list[tuple[str, str, str]],
) -> str:
    # Every remaining Feature waits on another remaining one, so walking those waits must come back round.
    left = set(remaining)
    path: list[tuple[str, str, str]] = []
    seen: dict[tuple[str, str, str], int] = {}
    key = remaining[0]
    while key not in seen:
        seen[key] = len(path)
        path.append(key)
        key = sorted(edges[key] & left, key=lambda other: _round_key(nodes[other]))[0]
    cycle = [*path[seen[key] :], key]
    chain = ", which must install after ".join(nodes[step].describe() for step in cycle)
    return (
        f"the Features cannot be ordered: their dependsOn and installsAfter form a cycle: {chain}. "
        "Remove one of these dependencies (or the Feature)"
    )


# --- contributions ----------------------------------------------------------------------------------------------


def metadata_entry(feature: ResolvedFeature) -> dict[str, Any]:
    """What ``feature`` adds to the container, shaped like an entry of the ``devcontainer.metadata`` label:
    ``id`` and whichever of containerEnv, mounts, capAdd, securityOpt, privileged, init, entrypoint,
    customizations and the lifecycle hooks its definition has."""
    entry: dict[str, Any] = {"id": str(feature.reference)}
    for key in (*_CONTRIBUTED, *LIFECYCLE_HOOKS):
        if key in feature.definition.data:
            entry[key] = feature.definition.data[key]
    return entry


# --- the build context ------------------------------------------------------------------------------------------

#: Where the Features' files are copied in the image (kept: a Feature's entrypoint or hooks may use them).
_IN_IMAGE = "/tmp/devyard-features"


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _dockerfile_value(value: str) -> str:
    # ENV keeps Dockerfile substitution (``${PATH}`` in a containerEnv is meant to expand); quotes and
    # backslashes are escaped, line breaks cannot be written.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _one_line(value: str, what: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"{what} {value!r} holds a line break")
    return value


_USERS_SCRIPT = """\
_CONTAINER_USER={container}
_REMOTE_USER={remote}
_home_of() {{
    case "$1" in root|0) echo /root; return ;; esac
    found=$(awk -F: -v who="$1" '$1 == who || $3 == who {{ print $6; exit }}' /etc/passwd 2>/dev/null)
    echo "${{found:-/home/$1}}"
}}
_CONTAINER_USER_HOME={container_home}
_REMOTE_USER_HOME={remote_home}
unset -f _home_of
"""


def write_build_context(
    directory: Path,
    *,
    base_image: str,
    features: Sequence[ResolvedFeature],
    container_user: str = "root",
    remote_user: str = "",
    container_user_home: str = "",
    remote_user_home: str = "",
    image_user: str = "",
    content_from: str = "",
) -> Path:
    """Write into ``directory`` (made, or empty) a ``Dockerfile`` and the files that install ``features``, in
    the order given, on ``base_image``; returns the Dockerfile's path.

    ``content_from``: the Dockerfile copies the files from the named build context of that name, which must be
    ``directory / "features"`` (``base_image`` may then be a stage of a Dockerfile these stages are appended
    to, as the reference CLI appends its Features to a user's Dockerfile); else from the context ``directory``.

    Each Feature's files are copied to ``/tmp/devyard-features/N-ID`` with its options in
    ``devcontainer-features.env``; its ``containerEnv`` becomes ``ENV`` (seen by it and every later Feature);
    its ``install.sh`` runs as root with ``_REMOTE_USER``, ``_CONTAINER_USER``, ``_REMOTE_USER_HOME`` and
    ``_CONTAINER_USER_HOME`` set (``remote_user`` defaults to ``container_user``; a home not given is read
    from the image's ``/etc/passwd`` at build time). ``image_user``, when given, is the ``USER`` the image ends
    with (the base image's own user).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise ValueError(f"the build context {directory} is not empty")
    remote_user = remote_user or container_user
    for value, what in (
        (base_image, "base image"),
        (container_user, "user"),
        (remote_user, "user"),
        (image_user, "user"),
    ):
        _one_line(value, what)
    lines = [f"FROM {base_image}", "USER root"]
    context_features = directory / "features"
    context_features.mkdir()
    (context_features / "users.sh").write_text(
        _USERS_SCRIPT.format(
            container=_shell_quote(container_user),
            remote=_shell_quote(remote_user),
            container_home=_shell_quote(container_user_home)
            if container_user_home
            else '"$(_home_of "$_CONTAINER_USER")"',
            remote_home=_shell_quote(remote_user_home) if remote_user_home else '"$(_home_of "$_REMOTE_USER")"',
        )
    )
    if content_from:
        _one_line(content_from, "build context name")
    source = f"--from={content_from} " if content_from else ""
    prefix = "" if content_from else "features/"
    lines.append(f"COPY --chown=0:0 {source}{prefix}users.sh {_IN_IMAGE}/users.sh")
    for number, feature in enumerate(features, start=1):
        name = f"{number}-{re.sub(r'[^A-Za-z0-9._-]', '_', feature.definition.id)}"
        target = context_features / name
        if not (feature.folder / "install.sh").is_file():
            raise _error(feature.definition.source, f"the Feature {feature.reference} has no install.sh")
        shutil.copytree(feature.folder, target, symlinks=True)
        (target / _ENV_FILE).write_text(
            "".join(f"{key}={_shell_quote(_one_line(value, 'option value'))}\n" for key, value in feature.env.items())
        )
        container_env = feature.definition.data.get("containerEnv", {})
        for key, value in container_env.items():
            if not _ENV_NAME.match(key):
                raise _error(feature.definition.source, f"containerEnv: {key!r} is not an environment variable name")
            lines.append(f"ENV {key}={_dockerfile_value(_one_line(value, 'containerEnv value'))}")
        lines.append(f"COPY --chown=0:0 {source}{prefix}{name}/ {_IN_IMAGE}/{name}/")
        lines.append(
            f"RUN cd {_IN_IMAGE}/{name} && set -a && . {_IN_IMAGE}/users.sh && . ./{_ENV_FILE} && set +a "
            "&& chmod +x ./install.sh && ./install.sh"
        )
    if image_user and image_user not in ("root", "0"):
        lines.append(f"USER {image_user}")
    dockerfile = directory / "Dockerfile"
    dockerfile.write_text("\n".join(lines) + "\n")
    return dockerfile
