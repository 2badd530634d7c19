"""Validation of a devcontainer.json document against the official schemas, with errors a person can act on.

The schemas ship in ``schemas/`` (see its SOURCES.md); the references the official schema makes by remote URL
(the VS Code and Codespaces parts, VS Code's settings) are served from there, so validation never reaches the
network. The validator is compiled once per process. Each problem becomes a ``ConfigError`` at the line and column
of the offending value (of the property's name for an unknown property); where several alternatives of a
``oneOf``/``anyOf`` fail, the one the value most nearly matches is reported.

Called by ``config.load``; the command line may call ``validate`` to check a file.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.resources
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema
from jsonschema.exceptions import ValidationError

from devyard.devcontainer.errors import ConfigError
from devyard.devcontainer.jsonc import Positions

__all__ = ["describe_path", "problems", "validate"]

_SPEC = "https://raw.githubusercontent.com/devcontainers/spec/main/schemas/"
_VSCODE = "https://raw.githubusercontent.com/microsoft/vscode/main/extensions/configuration-editing/schemas/"
_ROOT = _SPEC + "devContainer.schema.json"

# Messages for values whose schema alone would give a riddle (a regular expression, two alternatives).
# A path pattern matches a path of the same length; "*" matches any key or index.
_MESSAGES: list[tuple[tuple[str, ...], str]] = [
    (("forwardPorts", "*"), '{value} is not a port number or "host:port"'),
    (("appPort",), '{value} is not a port number, "host:container" ports, or a list of them'),
    (("appPort", "*"), '{value} is not a port number or "host:container" ports'),
    (("hostRequirements", "memory"), '{value} is not an amount such as "4gb" or "512mb"'),
    (("hostRequirements", "storage"), '{value} is not an amount such as "32gb"'),
    (("hostRequirements", "gpu"), '{value} is not true, false, "optional" or an object with cores and memory'),
    (
        ("mounts", "*"),
        '{value} is not a mount: a string such as "source=x,target=/y,type=volume" or an object '
        'with type ("bind" or "volume"), source and target',
    ),
]

_SHALLOW = frozenset({"type", "required", "additionalProperties", "unevaluatedProperties", "const", "enum"})


def validate(document: Any, positions: Positions, *, source: str) -> None:
    """Raises a ``ConfigError`` for the first problem (by line) of ``document``, a parsed devcontainer.json, if it
    has any; ``positions`` come from ``jsonc.parse_with_positions`` and ``source`` names the file."""
    found = problems(document, positions, source=source)
    if found:
        first = found[0]
        if len(found) > 1:
            more = len(found) - 1
            message = f"{first.message} (and {more} more problem{'s' if more > 1 else ''})"
            raise ConfigError(first.source, first.line, first.column, message)
        raise first


def problems(document: Any, positions: Positions, *, source: str) -> list[ConfigError]:
    """Every problem of ``document`` against the devcontainer.json schema, ordered by line and column."""
    errors = list(_validator().iter_errors(document))
    # Where the document fails the top-level alternatives, every property counts as "unevaluated": that is a
    # consequence, not a second problem.
    if any(error.validator == "oneOf" and not error.absolute_path for error in errors):
        errors = [e for e in errors if not (e.validator == "unevaluatedProperties" and not e.absolute_path)]
    leaves = [leaf for error in errors for leaf in _relevant(error)]
    # An object whose content fails has its properties "unevaluated" too: report what fails, not that.
    failing = [tuple(leaf.absolute_path) for leaf in leaves if leaf.validator != "unevaluatedProperties"]
    leaves = [
        leaf
        for leaf in leaves
        if leaf.validator != "unevaluatedProperties"
        or not any(path[: len(leaf.absolute_path)] == tuple(leaf.absolute_path) for path in failing)
    ]
    found: dict[tuple[int, int, str], ConfigError] = {}
    for leaf in leaves:
        for path, message, on_key in _explain(leaf):
            where = positions.key_at(path) if on_key else None
            line, column = where or positions.nearest(path)
            found.setdefault((line, column, message), ConfigError(source, line, column, message))
    return [found[key] for key in sorted(found)]


def describe_path(path: Sequence[str | int]) -> str:
    """A JSON path as people write it: ``build.args.X``, ``forwardPorts[0]``, ``portsAttributes["3000"]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$-]*", part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text or "the document"


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    registry = _registry()
    validator: jsonschema.protocols.Validator = jsonschema.Draft201909Validator(
        registry.contents(_ROOT), registry=registry
    )
    return validator


@functools.cache
def _registry() -> referencing.Registry[Any]:
    folder = importlib.resources.files("devyard.devcontainer") / "schemas"

    def load(name: str) -> Any:
        return json.loads((folder / name).read_text(encoding="utf-8"))

    root = {"$id": _ROOT, **load("devContainer.schema.json")}
    registry: referencing.Registry[Any] = referencing.Registry().with_resources(
        [
            (_ROOT, referencing.jsonschema.DRAFT201909.create_resource(root)),
            (
                _SPEC + "devContainer.base.schema.json",
                referencing.Resource.from_contents(load("devContainer.base.schema.json")),
            ),
            (
                _VSCODE + "devContainer.vscode.schema.json",
                referencing.Resource.from_contents(load("devContainer.vscode.schema.json")),
            ),
            (
                _VSCODE + "devContainer.codespaces.schema.json",
                referencing.Resource.from_contents(load("devContainer.codespaces.schema.json")),
            ),
            # VS Code's machine settings: whatever VS Code accepts, not ours to check.
            ("vscode://schemas/settings/machine", referencing.jsonschema.DRAFT7.create_resource({"type": "object"})),
        ]
    )
    return registry


def _relevant(error: ValidationError) -> list[ValidationError]:
    """The errors that say what is wrong: inside a failed ``oneOf``/``anyOf``, those of the alternative the value
    came closest to (not a mismatch of its type or shape, the deepest, the fewest problems)."""
    if error.validator not in ("oneOf", "anyOf") or not error.context:
        return [error]
    branches: dict[Any, list[ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    own = len(error.absolute_path)

    def leaves(errors: Iterable[ValidationError]) -> list[ValidationError]:
        return [leaf for sub in errors for leaf in _relevant(sub)]

    def rank(errors: list[ValidationError]) -> tuple[bool, int, int]:
        found = leaves(errors)
        shallow = any(leaf.validator in _SHALLOW and len(leaf.absolute_path) == own for leaf in found)
        depth = max(len(leaf.absolute_path) for leaf in found)
        return (shallow, -depth, len(found))

    best = min(branches.values(), key=rank)
    if rank(best)[0] and _message_for(tuple(error.absolute_path)) is not None:
        # No alternative fits this value at all: our words for the value say more than any alternative's.
        return [error]
    return leaves(best)


def _message_for(path: tuple[str | int, ...]) -> str | None:
    for pattern, message in _MESSAGES:
        if len(pattern) == len(path) and all(p == "*" or p == str(q) for p, q in zip(pattern, path, strict=True)):
            return message
    return None


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


def _either(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _explain(error: ValidationError) -> Iterator[tuple[tuple[str | int, ...], str, bool]]:
    """(path, message, whether the message is about the property's name) for one error."""
    path = tuple(error.absolute_path)
    where = describe_path(path)
    value = error.instance
    special = _message_for(path)
    kind = error.validator
    rule: Any = error.validator_value
    if kind in ("additionalProperties", "unevaluatedProperties") and isinstance(value, Mapping):
        if path:
            choices = sorted(error.schema.get("properties", {})) if isinstance(error.schema, Mapping) else []
        else:
            choices = sorted(_top_level_properties())
        for name in _extra_properties(error):
            hint = ""
            close = difflib.get_close_matches(name, choices, n=1)
            if close:
                hint = f' (did you mean "{close[0]}"?)'
            place = f" in {where}" if path else ""
            yield (*path, name), f'unknown property "{name}"{place}{hint}', True
        return
    if kind == "required" and isinstance(value, Mapping):
        missing = [name for name in rule if name not in value]
        if not path and missing and missing[0] in ("image", "build", "dockerComposeFile", "dockerFile"):
            yield path, 'a dev container needs "image" or "build" (with a "dockerfile")', False
            return
        for name in missing:
            yield path, f'{where}: the property "{name}" is required', False
        return
    if kind == "oneOf" and not path and not error.context:
        yield path, 'give one of "image", "build" or "dockerComposeFile", not several', False
        return
    if kind == "oneOf" and not path:
        yield path, 'a dev container needs "image" or "build" (with a "dockerfile")', False
        return
    if special is not None and kind in ("oneOf", "anyOf", "pattern", "type", "minimum", "maximum", "enum"):
        yield path, f"{where}: {special.format(value=_show(value))}", False
        return
    if isinstance(error.schema, Mapping) and "errorMessage" in error.schema:
        yield path, f"{where}: {_show(value)} is not valid: {error.schema['errorMessage']}", False
        return
    if kind == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        names = [_TYPE_NAMES.get(str(name), str(name)) for name in wanted]
        yield path, f"{where}: expected {_either(names)}, found {_kind(value)} ({_show(value)})", False
    elif kind == "enum":
        options = [_show(option) for option in rule]
        yield path, f"{where}: {_show(value)} is not one of {_either(options)}", False
    elif kind == "const":
        yield path, f"{where}: must be {_show(error.validator_value)}, not {_show(value)}", False
    elif kind == "pattern":
        yield path, f"{where}: {_show(value)} does not have the expected form (/{error.validator_value}/)", False
    elif kind == "minimum":
        yield path, f"{where}: {_show(value)} is less than {error.validator_value}", False
    elif kind == "maximum":
        yield path, f"{where}: {_show(value)} is more than {error.validator_value}", False
    elif kind in ("oneOf", "anyOf"):
        yield path, f"{where}: {_show(value)} is not any of the accepted forms", False
    else:
        yield path, f"{where}: {error.message}", False


def _extra_properties(error: ValidationError) -> list[str]:
    if error.validator == "unevaluatedProperties":
        # Which properties no part of the schema evaluated is known to the validator only; it names them (as
        # Python literals) in its message.
        said = re.fullmatch(
            r"Unevaluated properties are not allowed \((.*) (?:was|were) unexpected\)", error.message, re.S
        )
        if said is not None:
            names = ast.literal_eval(f"[{said.group(1)}]")
            return [name for name in names if isinstance(name, str)]
    instance: Any = error.instance
    if not isinstance(instance, Mapping):
        return []
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    known = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    return [name for name in instance if name not in known and not any(re.search(p, name) for p in patterns)]


@functools.cache
def _top_level_properties() -> frozenset[str]:
    registry = _registry()
    names: set[str] = set()
    seen: set[int] = set()

    def walk(schema: Any, resolver: Any) -> None:
        if not isinstance(schema, Mapping) or id(schema) in seen:
            return
        seen.add(id(schema))
        names.update(schema.get("properties", {}))
        for word in ("allOf", "oneOf", "anyOf"):
            for sub in schema.get(word, []):
                walk(sub, resolver)
        if "$ref" in schema:
            resolved = resolver.lookup(schema["$ref"])
            walk(resolved.contents, resolved.resolver)

    walk(registry.contents(_ROOT), registry.resolver(base_uri=_ROOT))
    return frozenset(names)
