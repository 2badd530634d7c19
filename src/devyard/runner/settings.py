"""The runner's settings, from ``devyard runner``'s options or ``DEVYARD_RUNNER_*`` environment variables.

Read by ``main.run_runner`` and the ``Agent``; the local daemon builds one for its embedded runner.
"""

from __future__ import annotations

import os
import socket
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from devyard.runner.fake_runtime import OPERATIONS

__all__ = ["RunnerSettings", "default_runtime"]


def default_runtime() -> Literal["fake", "linux"]:
    """``linux`` on Linux as root (what it needs to make namespaces, mounts and cgroups), else ``fake``."""
    return "linux" if sys.platform == "linux" and os.geteuid() == 0 else "fake"


class RunnerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEVYARD_RUNNER_", extra="forbid")

    #: The management plane's URL.
    server: str = "http://127.0.0.1:7480"
    #: The one-time exchange token from ``devyard runner create``; needed only until the runner has a
    #: credential in its state directory.
    exchange_token: str | None = None
    state_dir: Path = Path("/var/lib/devyard/runner")
    runtime: Literal["fake", "linux"] = Field(default_factory=default_runtime)
    #: Reconciles that may run at once.
    workers: int = Field(default=8, ge=1, le=1000)
    #: How many environments this runner offers to hold (the scheduler assigns no more).
    capacity: int = Field(default=100, ge=0)
    #: The host name reported to the server; default: this machine's.
    hostname: str = Field(default_factory=socket.gethostname)
    heartbeat_interval: float = Field(default=10.0, gt=0)
    #: Every environment is reconciled at least this often, so drift on the host gets corrected.
    resync_interval: float = Field(default=60.0, gt=0)
    #: The server sends a BOOKMARK this often on a quiet watch; a watch silent for three times as long is
    #: taken as broken and reopened.
    bookmark_interval: float = Field(default=10.0, gt=0)
    #: Backoff of a failing reconcile, per environment: ``base * 2**n`` seconds, at most ``max``.
    retry_base: float = Field(default=0.5, gt=0)
    retry_max: float = Field(default=60.0, gt=0)
    #: Backoff of reconnecting to a server that went away.
    reconnect_base: float = Field(default=0.5, gt=0)
    reconnect_max: float = Field(default=30.0, gt=0)
    #: A desktop runner serves one person on their own machine (``devyard up``): content may be a local folder or
    #: a ``file://`` repository, and devcontainer.json's ``initializeCommand`` runs on the host. A shared runner
    #: (the default) refuses all three: the host is not the user's.
    desktop: bool = False
    #: The image of environments whose spec names none.
    default_image: str = "mcr.microsoft.com/devcontainers/base:ubuntu"
    log_level: str = "INFO"

    #: Registries (``HOST:PORT``) reached over plain http instead of https (those on the loopback always are).
    insecure_registries: list[str] = Field(default_factory=list)
    #: The host ids that ids 0.. inside every environment map to (the user namespace), and how many.
    id_range_start: int = Field(default=1_000_000, ge=1)
    id_range_size: int = Field(default=65536, ge=1, le=1 << 24)
    #: The network the runner's bridge gives environments their addresses from.
    network_subnet: str = "10.89.0.0/16"
    #: The runner's bridge; each environment gets a veth pair to it.
    bridge: str = Field(default="devyard0", min_length=1, max_length=15)
    #: Networks environments may not reach, besides the host, link-local (metadata) addresses and each other.
    network_blocked_ranges: list[IPv4Network] = Field(default_factory=list)
    #: Ports of the bridge's address on the host that environments may reach (a DNS proxy, say); default none.
    network_allowed_host_ports: list[int] = Field(default_factory=list)
    #: Name servers for environments when the host has none they can reach; empty: 8.8.8.8 and 8.8.4.4.
    network_nameservers: list[IPv4Address] = Field(default_factory=list)
    #: Seconds a stopping environment gets between SIGTERM and SIGKILL.
    stop_timeout: float = Field(default=10.0, ge=0)
    #: Where the runner's gateway (exec, and later SSH and ports) listens, ``HOST:PORT`` (port 0: any free one);
    #: empty: no gateway (users cannot reach this runner's environments).
    gateway_listen: str = "0.0.0.0:7481"
    #: The gateway's URL as users reach it; default: from ``gateway_listen`` and ``hostname``.
    gateway_url: str | None = None
    #: Where the runner's SSH gateway (``ssh ENV_ID@HOST -p PORT``, scp, sftp) listens, ``HOST:PORT`` (port 0: any
    #: free one); empty: no SSH gateway.
    ssh_listen: str = ""
    #: The SSH gateway's host key, made at the first start if missing (mode 0600); default:
    #: ``<state_dir>/ssh_host_ed25519_key``.
    ssh_host_key: Path | None = None
    #: Where the runner's port proxy (``devyard env port``: an environment's ports over HTTP) listens,
    #: ``HOST:PORT`` (port 0: any free one); empty: no port proxy.
    ports_listen: str = ""
    #: Host-based port URLs, ``http://PORT-ID.DOMAIN[:listen port]/`` (ID: the environment id without ``env_``),
    #: under this domain, whose names (a wildcard) lead to the proxy; none: path-based URLs under ``ports_url``.
    ports_domain: str | None = None
    #: The proxy's public base URL (``https://ports.example.com``): path-based URLs are ``BASE/ports/ENV_ID/PORT/``,
    #: and host-based ones take its scheme and port; default: from ``ports_listen`` and ``hostname``.
    ports_url: str | None = None
    #: Connections the port proxy holds at once, in all and from one client address; more are refused (503, 429).
    ports_max_connections: int = Field(default=1024, ge=1)
    ports_max_connections_per_client: int = Field(default=128, ge=1)

    #: The fake runtime: seconds per operation (``pull``, ``create``, ``start``, ``stop``, ``delete``,
    #: ``exec``, ``inspect``, ``list``).
    fake_delays: dict[str, float] = Field(default_factory=dict)
    #: The fake runtime fails create/start/stop/delete (and pulls) with this probability.
    fake_failure_rate: float = Field(default=0.0, ge=0, le=1)
    fake_failure_permanent: bool = False
    #: Keep the fake runtime's containers in ``<state_dir>/fake-runtime.json`` across restarts.
    fake_persist: bool = True

    def credential_path(self) -> Path:
        return self.state_dir / "credential.json"

    def log_root(self) -> Path:
        """Where the environments' logs are written (``<id>/build.log``, ``lifecycle.log``, ``automations/``)."""
        return self.state_dir / "logs"

    def ssh_host_key_path(self) -> Path:
        return self.ssh_host_key or self.state_dir / "ssh_host_ed25519_key"

    def fake_state_path(self) -> Path | None:
        return self.state_dir / "fake-runtime.json" if self.fake_persist else None

    @field_validator("fake_delays")
    @classmethod
    def _known_operations(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"unknown fake runtime operations: {sorted(unknown)}")
        if any(delay < 0 for delay in value.values()):
            raise ValueError("delays must not be negative")
        return value

    @model_validator(mode="after")
    def _caps_above_bases(self) -> RunnerSettings:
        if self.retry_max < self.retry_base or self.reconnect_max < self.reconnect_base:
            raise ValueError("a backoff's max must not be less than its base")
        return self
