"""Runner: a host that connects out to the management plane and runs environments."""

from __future__ import annotations

import enum
from datetime import datetime

from pydantic import Field

from devyard.wire.meta import Condition, MetadataPatch, MetadataWrite, ReadModel, Resource, WriteModel

__all__ = [
    "GatewayEndpoint",
    "Runner",
    "RunnerCreate",
    "RunnerCreated",
    "RunnerCredential",
    "RunnerExchange",
    "RunnerPatch",
    "RunnerPhase",
    "RunnerSpec",
    "RunnerSpecPatch",
    "RunnerStatus",
    "RunnerStatusWrite",
]


class RunnerSpec(WriteModel):
    region: str = Field(default="default", min_length=1, max_length=63)
    description: str = Field(default="", max_length=1000)
    #: An administrator's cap on the environments this runner takes; None leaves it to the runner.
    max_environments: int | None = Field(default=None, ge=0)


class RunnerSpecPatch(WriteModel):
    region: str | None = Field(default=None, min_length=1, max_length=63)
    description: str | None = Field(default=None, max_length=1000)
    max_environments: int | None = Field(default=None, ge=0)


class RunnerPhase(enum.StrEnum):
    #: Created, its exchange token not yet traded for a credential.
    PENDING = "pending"
    ONLINE = "online"
    OFFLINE = "offline"


class GatewayEndpoint(ReadModel):
    ssh_host: str | None = None
    ssh_port: int | None = None
    http_url: str | None = None
    #: The port proxy's public base URL, once it listens (environments' ports are at ``status.ports[].url``).
    ports_url: str | None = None


class RunnerStatus(ReadModel):
    observed_generation: int = 0
    phase: RunnerPhase = RunnerPhase.PENDING
    conditions: list[Condition] = Field(default_factory=list)
    #: Set by the management plane when it hears from the runner.
    last_heartbeat_at: datetime | None = None
    version: str = ""
    runtime: str = ""
    hostname: str = ""
    #: How many environments the runner can hold; the scheduler assigns no more (nor more than the spec's cap).
    capacity: int = 0
    gateway: GatewayEndpoint | None = None


class Runner(Resource[RunnerSpec, RunnerStatus]):
    kind: str = "Runner"


class RunnerCreate(WriteModel):
    metadata: MetadataWrite = Field(default_factory=MetadataWrite)
    spec: RunnerSpec = Field(default_factory=RunnerSpec)


class RunnerPatch(WriteModel):
    metadata: MetadataPatch | None = None
    spec: RunnerSpecPatch | None = None
    resource_version: str | None = None


class RunnerCreated(ReadModel):
    """The answer to creating a runner: the exchange token is shown here once and never again."""

    runner: Runner
    exchange_token: str
    exchange_token_expires_at: datetime


class RunnerExchange(WriteModel):
    exchange_token: str = Field(min_length=1, max_length=200)
    #: The credential the runner proposes (``dyr_`` and at least 43 random URL-safe characters), kept in its state
    #: directory before it asks: a runner killed after the server said yes, but before it wrote the answer down,
    #: still holds a credential that works. None: the server makes one.
    credential: str | None = Field(default=None, pattern=r"^dyr_[A-Za-z0-9_-]{43,86}$")


class RunnerCredential(ReadModel):
    """A runner's long-lived credential, shown once, kept in the runner's state directory."""

    runner_id: str
    organization_id: str
    token: str


class RunnerStatusWrite(WriteModel):
    status: RunnerStatus
    resource_version: str | None = None
