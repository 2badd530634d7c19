"""EnvironmentClass: a size of environment (cpu, memory, disk) that runners offer."""

from __future__ import annotations

from pydantic import Field

from devyard.wire.meta import Condition, MetadataPatch, MetadataWrite, ReadModel, Resource, WriteModel

__all__ = [
    "EnvironmentClass",
    "EnvironmentClassCreate",
    "EnvironmentClassPatch",
    "EnvironmentClassSpec",
    "EnvironmentClassSpecPatch",
    "EnvironmentClassStatus",
]


class EnvironmentClassSpec(WriteModel):
    display_name: str = Field(default="", max_length=200)
    description: str = Field(default="", max_length=1000)
    cpu: float = Field(default=2.0, gt=0, le=1024)
    memory_mib: int = Field(default=4096, gt=0)
    disk_gib: int = Field(default=30, gt=0)
    #: The runners that offer this class; empty offers it on every runner of the organization.
    runner_ids: list[str] = Field(default_factory=list)
    enabled: bool = True
    #: Environments that name no class get the organization's default class.
    default: bool = False


class EnvironmentClassSpecPatch(WriteModel):
    display_name: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=1000)
    cpu: float | None = Field(default=None, gt=0, le=1024)
    memory_mib: int | None = Field(default=None, gt=0)
    disk_gib: int | None = Field(default=None, gt=0)
    runner_ids: list[str] | None = None
    enabled: bool | None = None
    default: bool | None = None


class EnvironmentClassStatus(ReadModel):
    conditions: list[Condition] = Field(default_factory=list)


class EnvironmentClass(Resource[EnvironmentClassSpec, EnvironmentClassStatus]):
    kind: str = "EnvironmentClass"


class EnvironmentClassCreate(WriteModel):
    metadata: MetadataWrite = Field(default_factory=MetadataWrite)
    spec: EnvironmentClassSpec = Field(default_factory=EnvironmentClassSpec)


class EnvironmentClassPatch(WriteModel):
    metadata: MetadataPatch | None = None
    spec: EnvironmentClassSpecPatch | None = None
    resource_version: str | None = None
