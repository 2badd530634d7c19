"""Project: a repository and how to make environments for it."""

from __future__ import annotations

from pydantic import Field, field_validator

from devyard.wire import git_context
from devyard.wire.meta import Condition, MetadataPatch, MetadataWrite, ReadModel, Resource, WriteModel

__all__ = [
    "PrebuildSettings",
    "Project",
    "ProjectCreate",
    "ProjectPatch",
    "ProjectSpec",
    "ProjectSpecPatch",
    "ProjectStatus",
]


class PrebuildSettings(WriteModel):
    enabled: bool = False
    branches: list[str] = Field(default_factory=list)
    class_id: str | None = None


class ProjectSpec(WriteModel):
    repository: str = Field(min_length=1, max_length=2048)
    ref: str | None = Field(default=None, max_length=255)
    devcontainer_path: str | None = Field(default=None, max_length=1024)
    automations_path: str | None = Field(default=None, max_length=1024)
    class_id: str | None = None
    prebuild: PrebuildSettings = Field(default_factory=PrebuildSettings)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("repository")
    @classmethod
    def _safe_repository(cls, value: str) -> str:
        # Its environments clone it: what GitContent would refuse must not be stored here either.
        git_context.check_url_is_safe(value)
        return value


class ProjectSpecPatch(WriteModel):
    repository: str | None = Field(default=None, min_length=1, max_length=2048)
    ref: str | None = Field(default=None, max_length=255)
    devcontainer_path: str | None = Field(default=None, max_length=1024)
    automations_path: str | None = Field(default=None, max_length=1024)
    class_id: str | None = None
    prebuild: PrebuildSettings | None = None
    env: dict[str, str] | None = None

    @field_validator("repository")
    @classmethod
    def _safe_repository(cls, value: str | None) -> str | None:
        if value is not None:
            git_context.check_url_is_safe(value)
        return value


class ProjectStatus(ReadModel):
    conditions: list[Condition] = Field(default_factory=list)


class Project(Resource[ProjectSpec, ProjectStatus]):
    kind: str = "Project"


class ProjectCreate(WriteModel):
    metadata: MetadataWrite = Field(default_factory=MetadataWrite)
    spec: ProjectSpec


class ProjectPatch(WriteModel):
    metadata: MetadataPatch | None = None
    spec: ProjectSpecPatch | None = None
    resource_version: str | None = None
