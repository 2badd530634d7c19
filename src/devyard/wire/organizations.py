"""Organization, User and Membership: who uses devyard and the tenancy boundary between them."""

from __future__ import annotations

import enum

from pydantic import Field

from devyard.wire.environments import GitContent
from devyard.wire.meta import Condition, MetadataPatch, MetadataWrite, ReadModel, Resource, WriteModel

__all__ = [
    "Membership",
    "MembershipCreate",
    "MembershipPatch",
    "MembershipSpec",
    "MembershipSpecPatch",
    "Organization",
    "OrganizationCreate",
    "OrganizationPatch",
    "OrganizationPolicy",
    "OrganizationSpec",
    "OrganizationSpecPatch",
    "Role",
    "User",
    "UserCreate",
    "UserPatch",
    "UserSpec",
    "UserSpecPatch",
    "Whoami",
]


class OrganizationPolicy(WriteModel):
    #: Whether ports may be shared with everyone (no login).
    allow_public_ports: bool = True
    #: The idle timeout, in seconds, of environments that set none; 0 never times out.
    default_timeout: int = Field(default=3600, ge=0)
    max_environments_per_user: int | None = Field(default=None, ge=0)
    default_image: str | None = None


class OrganizationSpec(WriteModel):
    display_name: str = Field(default="", max_length=200)
    policy: OrganizationPolicy = Field(default_factory=OrganizationPolicy)


class OrganizationSpecPatch(WriteModel):
    display_name: str | None = Field(default=None, max_length=200)
    policy: OrganizationPolicy | None = None


class OrganizationStatus(ReadModel):
    conditions: list[Condition] = Field(default_factory=list)


class Organization(Resource[OrganizationSpec, OrganizationStatus]):
    kind: str = "Organization"


class OrganizationCreate(WriteModel):
    metadata: MetadataWrite
    spec: OrganizationSpec = Field(default_factory=OrganizationSpec)


class OrganizationPatch(WriteModel):
    metadata: MetadataPatch | None = None
    spec: OrganizationSpecPatch | None = None
    resource_version: str | None = None


class UserSpec(WriteModel):
    display_name: str = Field(default="", max_length=200)
    email: str | None = Field(default=None, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    #: The user's dotfiles repository: each environment they create installs it on its first start.
    dotfiles: GitContent | None = None


class UserSpecPatch(WriteModel):
    display_name: str | None = Field(default=None, max_length=200)
    email: str | None = Field(default=None, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    #: Null removes it.
    dotfiles: GitContent | None = None
    #: Suspend or restore: a suspended user's tokens stop working.
    suspended: bool | None = None


class UserStatus(ReadModel):
    suspended: bool = False
    conditions: list[Condition] = Field(default_factory=list)


class User(Resource[UserSpec, UserStatus]):
    kind: str = "User"


class Role(enum.StrEnum):
    ADMIN = "admin"
    MEMBER = "member"


class UserCreate(WriteModel):
    """A new user; the caller's organization (or ``metadata.organization_id``) gets it as a member."""

    metadata: MetadataWrite
    spec: UserSpec = Field(default_factory=UserSpec)
    role: Role = Role.MEMBER


class UserPatch(WriteModel):
    metadata: MetadataPatch | None = None
    spec: UserSpecPatch | None = None
    resource_version: str | None = None


class MembershipSpec(WriteModel):
    user_id: str
    role: Role = Role.MEMBER


class MembershipSpecPatch(WriteModel):
    role: Role | None = None


class MembershipStatus(ReadModel):
    conditions: list[Condition] = Field(default_factory=list)


class Membership(Resource[MembershipSpec, MembershipStatus]):
    kind: str = "Membership"


class MembershipCreate(WriteModel):
    metadata: MetadataWrite = Field(default_factory=MetadataWrite)
    spec: MembershipSpec


class MembershipPatch(WriteModel):
    spec: MembershipSpecPatch
    resource_version: str | None = None


class Whoami(ReadModel):
    """Who a credential belongs to."""

    principal: str  # "user" | "runner"
    id: str
    name: str
    #: A runner's organization (None for users, whose organizations are in ``memberships``).
    organization_id: str | None = None
    memberships: list[Membership] = Field(default_factory=list)
