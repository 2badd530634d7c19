"""The parts every resource shares: metadata, conditions, lists, watch events and the error envelope."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

# Re-exported: they live without pydantic so that the CLI reads watch streams without importing it.
from devyard.wire.watch_events import WatchEvent, WatchEventType

__all__ = [
    "NAME_PATTERN",
    "Condition",
    "ConditionStatus",
    "ErrorBody",
    "ErrorCode",
    "ErrorEnvelope",
    "ListResponse",
    "Metadata",
    "MetadataPatch",
    "MetadataWrite",
    "ReadModel",
    "Resource",
    "WatchEvent",
    "WatchEventType",
    "WriteModel",
]

#: Names are DNS-label-like so that they work in host names, paths and shells.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


class WriteModel(BaseModel):
    """A body a client sends: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ReadModel(BaseModel):
    """A body a client receives: unknown fields are ignored, so older clients read newer servers."""

    model_config = ConfigDict(extra="ignore")


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ReadModel):
    """One observation about a resource, after the Kubernetes API conventions."""

    type: str
    status: ConditionStatus
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int = 0


class Metadata(ReadModel):
    id: str
    name: str
    organization_id: str | None = None
    creator_id: str | None = None
    created_at: datetime
    updated_at: datetime
    labels: dict[str, str] = Field(default_factory=dict)
    generation: int = 1
    #: Opaque to clients: changes on every write; watch resumes from it, and a write that carries a stale one
    #: is refused with 409.
    resource_version: str


class MetadataWrite(WriteModel):
    """The metadata a client may set when it creates a resource."""

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    organization_id: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class MetadataPatch(WriteModel):
    """Metadata changes: a field not given is left alone."""

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    labels: dict[str, str] | None = None


SpecT = TypeVar("SpecT", bound=BaseModel)
StatusT = TypeVar("StatusT", bound=BaseModel)


class Resource(ReadModel, Generic[SpecT, StatusT]):
    kind: str
    metadata: Metadata
    spec: SpecT
    status: StatusT


ItemT = TypeVar("ItemT", bound=BaseModel)


class ListResponse(ReadModel, Generic[ItemT]):
    items: list[ItemT]
    #: Watch from here to see every change after this list.
    resource_version: str
    #: Pass as ``page_token`` for the next page; absent on the last page.
    next_page_token: str | None = None


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    GONE = "gone"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    VALIDATION_FAILED = "validation_failed"
    TOO_MANY_REQUESTS = "too_many_requests"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"


class ErrorBody(ReadModel):
    code: ErrorCode
    message: str
    details: list[dict[str, Any]] | dict[str, Any] | None = None


class ErrorEnvelope(ReadModel):
    """The body of every error response: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorBody


Kind = Literal[
    "Organization",
    "User",
    "Membership",
    "Token",
    "Runner",
    "EnvironmentClass",
    "Project",
    "Environment",
    "Secret",
    "SSHKey",
    "AuditEvent",
]
