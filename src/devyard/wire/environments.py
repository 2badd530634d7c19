"""Environment: a development environment that a runner makes real."""

from __future__ import annotations

import enum
from datetime import datetime

from pydantic import Field, model_validator

from devyard.wire import git_context
from devyard.wire.automations import AutomationStatus
from devyard.wire.meta import Condition, MetadataPatch, MetadataWrite, ReadModel, Resource, WriteModel

__all__ = [
    "Admission",
    "AutomationAction",
    "AutomationRequest",
    "ContentSpec",
    "DesiredPhase",
    "Environment",
    "EnvironmentCreate",
    "EnvironmentPatch",
    "EnvironmentPhase",
    "EnvironmentSpec",
    "EnvironmentSpecPatch",
    "EnvironmentStatus",
    "EnvironmentStatusWrite",
    "GitContent",
    "PortProtocol",
    "PortSpec",
    "PortStatus",
    "SSHEndpoint",
]


class DesiredPhase(enum.StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    DELETED = "deleted"


class EnvironmentPhase(enum.StrEnum):
    PENDING = "pending"
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"


class Admission(enum.StrEnum):
    """Who may reach a shared port."""

    OWNER = "owner"
    ORGANIZATION = "organization"
    EVERYONE = "everyone"


class PortProtocol(enum.StrEnum):
    HTTP = "http"
    HTTPS = "https"


class GitContent(WriteModel):
    """A repository to clone: ``url`` as git takes it (``git_context.parse_git_context`` reads what people paste),
    ``ref`` a branch, tag or commit (default: the remote's default branch)."""

    url: str = Field(min_length=1, max_length=2048)
    ref: str | None = Field(default=None, max_length=255)
    #: A shallow clone of this many commits; None clones the whole history.
    depth: int | None = Field(default=None, ge=1, le=1_000_000)
    #: A partial clone: ``blob:none`` fetches file contents on demand, ``tree:0`` trees too,
    #: ``blob:limit=SIZE`` (``1m``, ``500k``) leaves out the larger files.
    filter: str | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _check(self) -> GitContent:
        # Only what is never acceptable; the runner checks the rest (a file:// URL is fine on a desktop runner).
        git_context.check_url_is_safe(self.url)
        if self.ref is not None:
            git_context.check_ref(self.ref)
        if self.filter is not None:
            git_context.check_partial_clone_filter(self.filter)
        return self


class ContentSpec(WriteModel):
    """Where the environment's code comes from: a git repository or, on a desktop runner, a local folder."""

    git: GitContent | None = None
    local_path: str | None = Field(default=None, min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _exactly_one(self) -> ContentSpec:
        if (self.git is None) == (self.local_path is None):
            raise ValueError("content needs exactly one of 'git' and 'local_path'")
        return self


class AutomationAction(enum.StrEnum):
    START = "start"
    STOP = "stop"


class AutomationRequest(WriteModel):
    """A person's request to start or stop one automation (``devyard automations start ENV ID``). The runner acts
    on each ``request_id`` once; a new id asks again (a task run again, say)."""

    action: AutomationAction
    request_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


class PortSpec(WriteModel):
    port: int = Field(ge=1, le=65535)
    name: str = Field(default="", max_length=100)
    admission: Admission = Admission.OWNER
    protocol: PortProtocol = PortProtocol.HTTP


class EnvironmentSpec(WriteModel):
    desired_phase: DesiredPhase = DesiredPhase.RUNNING
    class_id: str | None = None
    content: ContentSpec | None = None
    devcontainer_path: str | None = Field(default=None, max_length=1024)
    #: The automations file, relative to the repository; None: ``.devyard/automations.yaml``, else
    #: ``.gitpod/automations.yaml``.
    automations_path: str | None = Field(default=None, max_length=1024)
    image: str | None = Field(default=None, max_length=1024)
    #: Idle timeout in seconds; None uses the organization's default, 0 never times out.
    timeout: int | None = Field(default=None, ge=0, le=30 * 24 * 3600)
    ports: list[PortSpec] = Field(default_factory=list, max_length=100)
    env: dict[str, str] = Field(default_factory=dict)
    #: Secret ids to give the environment, besides those its scope gives it anyway.
    secrets: list[str] = Field(default_factory=list, max_length=100)
    project_id: str | None = None
    #: Automation id -> the latest request to start or stop it by hand.
    automation_requests: dict[str, AutomationRequest] = Field(default_factory=dict, max_length=200)
    #: A new value rebuilds the dev container (``devyard env rebuild``): the container is made again from the
    #: repository's dev container definition; the workspace is kept.
    rebuild_request: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    #: A dotfiles repository installed on the first start (into ``~/dotfiles``; its install script, or links).
    #: Not given at creation: the creator's own (``UserSpec.dotfiles``); null: none.
    dotfiles: GitContent | None = None


class EnvironmentSpecPatch(WriteModel):
    """A partial spec: fields not given are left as they are."""

    desired_phase: DesiredPhase | None = None
    class_id: str | None = None
    content: ContentSpec | None = None
    devcontainer_path: str | None = Field(default=None, max_length=1024)
    automations_path: str | None = Field(default=None, max_length=1024)
    image: str | None = Field(default=None, max_length=1024)
    timeout: int | None = Field(default=None, ge=0, le=30 * 24 * 3600)
    ports: list[PortSpec] | None = Field(default=None, max_length=100)
    env: dict[str, str] | None = None
    secrets: list[str] | None = Field(default=None, max_length=100)
    automation_requests: dict[str, AutomationRequest] | None = Field(default=None, max_length=200)
    rebuild_request: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


class SSHEndpoint(ReadModel):
    host: str
    port: int
    user: str


class PortStatus(ReadModel):
    port: int
    #: The spec's name for it, else its devcontainer.json label.
    name: str = ""
    admission: Admission = Admission.OWNER
    protocol: PortProtocol = PortProtocol.HTTP
    #: Where the runner's port proxy serves it; None when the runner has no port proxy.
    url: str | None = None
    #: Whether something listens on it inside now (a forwarded or shared port may not, yet).
    listening: bool = False
    #: devcontainer.json's ``portsAttributes`` label.
    label: str = ""
    #: devcontainer.json's ``portsAttributes`` onAutoForward (``notify``, ``openBrowser``, ``silent``...).
    on_auto_forward: str | None = None


class EnvironmentStatus(ReadModel):
    observed_generation: int = 0
    phase: EnvironmentPhase = EnvironmentPhase.PENDING
    conditions: list[Condition] = Field(default_factory=list)
    #: Set by the management plane's scheduler; a runner's status write cannot change it.
    runner_id: str | None = None
    ssh: SSHEndpoint | None = None
    #: The folder inside where the code is (the dev container's workspaceFolder); editors open it.
    workspace_folder: str | None = None
    ports: list[PortStatus] = Field(default_factory=list)
    #: Seconds spent in each start phase (schedule, pull, create, start, ...).
    timings: dict[str, float] = Field(default_factory=dict)
    last_activity_at: datetime | None = None
    snapshot: str | None = None
    #: The automations (services and tasks) and where each stands.
    automations: list[AutomationStatus] = Field(default_factory=list)
    message: str = ""


class Environment(Resource[EnvironmentSpec, EnvironmentStatus]):
    kind: str = "Environment"


class EnvironmentCreate(WriteModel):
    metadata: MetadataWrite = Field(default_factory=MetadataWrite)
    spec: EnvironmentSpec = Field(default_factory=EnvironmentSpec)


class EnvironmentPatch(WriteModel):
    metadata: MetadataPatch | None = None
    spec: EnvironmentSpecPatch | None = None
    #: When given, the write is refused with 409 unless it is the resource's current version.
    resource_version: str | None = None


class EnvironmentStatusWrite(WriteModel):
    status: EnvironmentStatus
    resource_version: str | None = None
