"""Access tickets: the management plane's permission to reach a running environment through its runner's gateway.

Called by ``api.environments`` (``issue``: a user asks for access) and ``api.runners`` (``gateway_key``: a runner
fetches the key it checks tickets with). Each runner has its own key, derived from the server's secret key and
the runner's id, so every replica issues tickets the runner accepts, and a ticket for one runner is worthless on
another. The ticket's format is ``devyard.wire.access``.
"""

from __future__ import annotations

import secrets as random_secrets
from datetime import UTC, datetime
from typing import Final

from sqlalchemy.ext.asyncio import AsyncSession

from devyard.server import policy
from devyard.server.auth import Principal
from devyard.server.state import SecretBox
from devyard.server.store import resources
from devyard.server.store.errors import Conflict, Forbidden
from devyard.wire.access import (
    EnvironmentAccess,
    GatewayKey,
    TicketClaims,
    TicketScope,
    encode_key,
    sign_ticket,
)
from devyard.wire.environments import EnvironmentPhase

__all__ = ["PORT_TICKET_TTL", "TICKET_TTL", "gateway_key", "issue", "runner_gateway_key"]

#: Seconds a ticket is good for: long enough to open a connection, short enough that a leaked one is stale.
TICKET_TTL: Final = 60
#: Seconds a port ticket is good for: a browser trades it for the proxy's session at once, but ``curl`` and scripts
#: present it on every request, as many times as they like, until then.
PORT_TICKET_TTL: Final = 600


def runner_gateway_key(box: SecretBox, runner_id: str) -> bytes:
    return box.derive_key(b"gateway-ticket:" + runner_id.encode())


async def issue(
    tx: resources.Tx,
    principal: Principal,
    environment_id: str,
    box: SecretBox,
    *,
    now: float,
    scope: TicketScope = "exec",
) -> EnvironmentAccess:
    """A ticket to exec in the environment, for a user who may change it, when it runs on a runner with a
    gateway; or (``scope="port"``) to reach its ports through the runner's port proxy, for a user who may see it
    (the proxy then applies each port's admission). ``Conflict`` otherwise. Audited as ``environment.access``."""
    if principal.is_runner:  # a ticket names a user
        await policy.visible(tx.session, principal, "Environment", environment_id)  # 404 for what it cannot see
        raise Forbidden("a runner may not ask for access to an environment")
    if scope == "port":
        row = await policy.visible(tx.session, principal, "Environment", environment_id)
    else:
        row = await policy.changeable(tx.session, principal, "Environment", environment_id)
    phase = row.status.get("phase") or EnvironmentPhase.PENDING.value
    if phase != EnvironmentPhase.RUNNING.value:
        raise Conflict(f"environment {row.name} ({row.id}) is {phase}, not running: start it first")
    if row.runner_id is None:
        raise Conflict(f"environment {row.name} ({row.id}) has no runner yet")
    runner = await resources.get(tx.session, "Runner", row.runner_id)
    gateway = (runner.status.get("gateway") or {}) if runner is not None else {}
    url = gateway.get("http_url")
    if runner is not None and scope == "port":
        url = url or ""  # the ports' own URLs are in the environment's status.ports
    elif runner is None or not url:
        raise Conflict(
            f"runner {runner.name if runner else row.runner_id} of environment {row.id} reports no gateway: "
            "it may be starting, or too old to offer one"
        )
    assert runner is not None and url is not None
    expires = int(now) + (PORT_TICKET_TTL if scope == "port" else TICKET_TTL)
    claims = TicketClaims(
        environment_id=row.id,
        user_id=principal.id,
        runner_id=runner.id,
        scope=scope,
        organization_id=row.organization_id if scope == "port" else None,
        exp=expires,
        nonce=random_secrets.token_urlsafe(12),
    )
    ticket = sign_ticket(claims, runner_gateway_key(box, runner.id))
    expires_at = datetime.fromtimestamp(expires, UTC)
    tx.audit("access", row, {"scope": scope, "runner_id": runner.id, "expires_at": expires_at.isoformat()})
    return EnvironmentAccess(gateway_url=url, environment_id=row.id, ticket=ticket, expires_at=expires_at, scope=scope)


async def gateway_key(session: AsyncSession, principal: Principal, runner_id: str, box: SecretBox) -> GatewayKey:
    """The runner's own gateway key, for that runner only (others: 404 if they may not see it, else 403)."""
    row = await policy.visible(session, principal, "Runner", runner_id)
    if not principal.is_runner or principal.id != row.id:
        raise Forbidden(f"only runner {row.name} itself may fetch its gateway key")
    return GatewayKey(runner_id=row.id, key=encode_key(runner_gateway_key(box, row.id)))
