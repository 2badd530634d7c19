"""Image references: parsed, checked and normalized (``busybox`` -> ``docker.io/library/busybox:latest``).

Called by the store (every reference it is given), the registry client (host, repository, tag or digest) and
the ``devyard image`` commands. The grammar is the one of the distribution project's reference package: a
first component is a registry host when it holds a ``.`` or a ``:`` or is ``localhost``; Docker Hub's short
names get ``docker.io`` and, with one component, ``library/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from devyard.runner.errors import PermanentError

__all__ = ["DOCKER_HUB", "LOCAL_REGISTRY", "InvalidReference", "Reference", "is_digest", "parse_reference"]

#: The registry host of references without one.
DOCKER_HUB = "docker.io"
#: A registry host that is never contacted: images under it come only from ``import`` and ``bootstrap``.
LOCAL_REGISTRY = "devyard.local"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_HOST = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?\Z"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}\Z")
_MAX_NAME = 255


class InvalidReference(PermanentError, ValueError):
    """A reference that does not parse: a ``ValueError`` for callers that check input, and permanent for the
    runner (retrying will not fix the spec)."""


def is_digest(text: str) -> bool:
    """Whether ``text`` is a ``sha256:<64 hex>`` digest (the only algorithm the store handles)."""
    return _DIGEST.match(text) is not None


@dataclass(frozen=True)
class Reference:
    """A parsed, normalized image reference; ``str()`` gives its canonical form."""

    #: ``docker.io``, ``ghcr.io``, ``127.0.0.1:5000``...
    registry: str
    #: ``library/busybox``, ``a/b``...
    repository: str
    #: Empty when the reference has only a digest.
    tag: str = ""
    #: ``sha256:...`` or empty.
    digest: str = ""

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def lookup(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest when there is one, else the tag."""
        return self.digest or self.tag

    @property
    def is_local(self) -> bool:
        """Whether this names an image that only import and bootstrap make (never pulled)."""
        return self.registry == LOCAL_REGISTRY

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parse and normalize ``text``; raises ``InvalidReference`` (a ``ValueError``) saying what is wrong with it."""
    original = text
    if not text or text != text.strip():
        raise InvalidReference(f"invalid image reference {original!r}: empty or surrounded by whitespace")
    digest = ""
    if "@" in text:
        text, _, digest = text.partition("@")
        if not is_digest(digest):
            raise InvalidReference(
                f"invalid image reference {original!r}: the digest must be sha256: and 64 lowercase hex digits"
            )
    tag = ""
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidReference(
                f"invalid image reference {original!r}: the tag {tag!r} must be letters, digits, '_', '.' or '-' "
                "(at most 128, not starting with '.' or '-')"
            )
    parts = text.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        registry, components = first, parts[1:]
        if not _HOST.match(registry):
            raise InvalidReference(f"invalid image reference {original!r}: {registry!r} is not a valid registry host")
        registry = registry.lower()
    else:
        registry, components = DOCKER_HUB, parts
    if registry in _DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if len(components) == 1:
            components = ["library", *components]
    for component in components:
        if not _COMPONENT.match(component):
            raise InvalidReference(
                f"invalid image reference {original!r}: the path component {component!r} must be lowercase "
                "letters and digits, separated by '.', '_', '__' or '-'"
            )
    repository = "/".join(components)
    if len(f"{registry}/{repository}") > _MAX_NAME:
        raise InvalidReference(f"invalid image reference {original!r}: the name is longer than {_MAX_NAME} characters")
    if not tag and not digest:
        tag = "latest"
    return Reference(registry, repository, tag, digest)
