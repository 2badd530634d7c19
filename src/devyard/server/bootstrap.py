"""First start on an empty database: organization ``default``, an admin user and an admin token.

The token's secret is written to ``<state-dir>/admin-token`` (mode 0600) and nowhere else. Called by the app's
lifespan; replicas starting at once on one PostgreSQL race harmlessly (the loser's insert conflicts).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from devyard.server import auth
from devyard.server.database.tables import ResourceRow, ServerFactRow
from devyard.server.state import ServerState
from devyard.server.store import resources
from devyard.server.store.errors import Conflict
from devyard.server.store.organizations import add_membership, new_organization
from devyard.wire.organizations import OrganizationSpec, Role

__all__ = ["ADMIN_TOKEN_FILE", "bootstrap", "check_secret_key"]

ADMIN_TOKEN_FILE = "admin-token"
log = logging.getLogger(__name__)


async def bootstrap(state: ServerState) -> bool:
    """Make the first organization, admin and token if the database has none; True if it did."""
    try:
        async with state.database.write() as session:
            if await session.scalar(select(ResourceRow.id).where(ResourceRow.kind == "Organization").limit(1)):
                return False
            tx = resources.Tx(session)
            org = new_organization("default", OrganizationSpec(display_name="Default organization"), None)
            tx.create(org, action="bootstrap")
            user = resources.new_row(
                "User",
                name="admin",
                organization_id=None,
                creator_id=None,
                spec={"display_name": "Administrator", "email": None},
                status={"organization_ids": [org.id]},
            )
            tx.create(user, action="bootstrap")
            add_membership(tx, user, org.id, Role.ADMIN, None)
            token = resources.new_row(
                "Token",
                name="admin",
                organization_id=org.id,
                creator_id=user.id,
                spec={"description": "made on first start", "expires_at": None, "user_id": user.id},
            )
            secret, credential = auth.new_credential("user", token_id=token.id, subject_id=user.id, expires_at=None)
            token.status = {"prefix": secret[:10]}
            token.scope = user.id
            tx.create(token, action="bootstrap")
            tx.add_after(credential)
            await tx.commit()
    except Conflict:
        # Another replica may have won the race; anything else is a real failure.
        async with state.database.read() as session:
            if await session.scalar(select(ResourceRow.id).where(ResourceRow.kind == "Organization").limit(1)):
                log.info("another server replica bootstrapped the database")
                return False
        raise
    _write_secret(Path(state.settings.state_dir) / ADMIN_TOKEN_FILE, secret)
    log.info("created organization 'default', user 'admin' and its token in %s", ADMIN_TOKEN_FILE)
    return True


async def check_secret_key(state: ServerState) -> None:
    """Refuse to start with a key other than the one the database's secrets were sealed with: every replica
    must share it, and a wrong one would fail only later, at each secret."""
    fingerprint = state.secrets.fingerprint()
    try:
        async with state.database.write() as session:
            fact = await session.get(ServerFactRow, "secret_key")
            if fact is None:
                session.add(ServerFactRow(name="secret_key", value=fingerprint))
                return
    except IntegrityError:
        async with state.database.read() as session:
            fact = await session.get(ServerFactRow, "secret_key")
    if fact is not None and fact.value != fingerprint:
        raise RuntimeError(
            "this server's secret key is not the one the database's secrets were encrypted with: give every "
            "server the same key (DEVYARD_SERVER_SECRET_KEY, or the same <state-dir>/secret-key)"
        )


def _write_secret(path: Path, secret: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
