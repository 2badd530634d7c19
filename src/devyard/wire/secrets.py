"""Secret: a value given to environments, encrypted at rest; its value is never read back through the API."""

from __future__ import annotations

import enum
import re

from pydantic import Field, model_validator

from devyard.wire.meta import Condition, MetadataWrite, ReadModel, Resource, WriteModel

__all__ = [
    "Secret",
    "SecretCreate",
    "SecretPatch",
    "SecretScope",
    "SecretSpec",
    "SecretSpecRead",
    "SecretStatus",
    "SecretType",
    "SecretValue",
]


#: A registry's host name or address, with an optional port.
_REGISTRY_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?")


class SecretScope(enum.StrEnum):
    ORGANIZATION = "organization"
    PROJECT = "project"
    USER = "user"


class SecretType(enum.StrEnum):
    ENVIRONMENT_VARIABLE = "environment_variable"
    FILE = "file"
    GIT_CREDENTIAL = "git_credential"
    REGISTRY_CREDENTIAL = "registry_credential"


class SecretSpecRead(ReadModel):
    scope: SecretScope = SecretScope.USER
    project_id: str | None = None
    type: SecretType = SecretType.ENVIRONMENT_VARIABLE
    #: The variable name, the file's absolute path, or the git or registry host.
    target: str


class SecretSpec(WriteModel):
    scope: SecretScope = SecretScope.USER
    project_id: str | None = None
    type: SecretType = SecretType.ENVIRONMENT_VARIABLE
    target: str = Field(min_length=1, max_length=1024)
    value: str = Field(max_length=256 * 1024)

    @model_validator(mode="after")
    def _check(self) -> SecretSpec:
        if (self.scope == SecretScope.PROJECT) != (self.project_id is not None):
            raise ValueError("project_id is required for, and only for, scope 'project'")
        if self.type == SecretType.FILE and not self.target.startswith("/"):
            raise ValueError("a file secret's target must be an absolute path")
        if self.type == SecretType.ENVIRONMENT_VARIABLE and not self.target.replace("_", "a").isalnum():
            raise ValueError("an environment variable's name may hold only letters, digits and '_'")
        if self.type == SecretType.REGISTRY_CREDENTIAL:
            if not _REGISTRY_HOST.fullmatch(self.target):
                raise ValueError("a registry credential's target is the registry's host, as in ghcr.io or host:5000")
            if ":" not in self.value:
                raise ValueError("a registry credential's value is USERNAME:PASSWORD")
        return self


class SecretStatus(ReadModel):
    conditions: list[Condition] = Field(default_factory=list)


class Secret(Resource[SecretSpecRead, SecretStatus]):
    kind: str = "Secret"


class SecretCreate(WriteModel):
    metadata: MetadataWrite = Field(default_factory=MetadataWrite)
    spec: SecretSpec


class SecretPatch(WriteModel):
    """Replaces the value; nothing else of a secret changes."""

    value: str = Field(max_length=256 * 1024)
    resource_version: str | None = None


class SecretValue(ReadModel):
    """A secret as its environment's runner receives it."""

    id: str
    name: str
    type: SecretType
    target: str
    value: str
