"""Environment networks: one network namespace per environment, a veth pair to the runner's bridge, addresses
from the runner's subnet, NAT egress and isolation with nftables, and the environment's resolv.conf and hosts.

Called by ``linux.runtime.LinuxRuntime``: ``attach`` before a container is created (the container joins
``Attachment.netns_path``), ``detach`` when it is deleted; ``attachments`` lists what the host has, for
adoption and for the doctor.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Attachment", "Network"]


@dataclass(frozen=True)
class Attachment:
    """One environment's place on the runner's network."""

    environment_id: str
    #: A bind mount of the namespace (``/run/devyard/netns/<id>``): the container's ``network`` namespace path.
    netns_path: Path
    address: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    #: The host-side end of the veth pair.
    host_interface: str
    #: The contents of the environment's /etc/resolv.conf and /etc/hosts.
    resolv_conf: str
    hosts: str


class Network:
    """The runner's bridge and the environments attached to it. (To be implemented.)"""

    def __init__(self, state_dir: Path, *, subnet: str = "10.89.0.0/16", bridge: str = "devyard0") -> None:
        self.state_dir = state_dir
        self.subnet = ipaddress.IPv4Network(subnet)
        self.bridge = bridge

    async def setup(self) -> None:
        """Make the bridge and the nftables table if missing; idempotent."""
        raise NotImplementedError

    async def attach(self, environment_id: str, *, hostname: str) -> Attachment:
        """The environment's network namespace, veth and address, made if missing; idempotent."""
        raise NotImplementedError

    async def detach(self, environment_id: str) -> None:
        """Remove the environment's namespace, veth, address and rules; nothing if it has none."""
        raise NotImplementedError

    async def attachments(self) -> list[Attachment]:
        """Every environment attached on this host, as the host shows it."""
        raise NotImplementedError
