"""SSH public keys: a user's own; runners read those of the owners of their environments."""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from devyard.server import policy
from devyard.server.auth import Principal
from devyard.server.database.tables import ResourceRow
from devyard.server.store import resources
from devyard.server.store.errors import Conflict, Invalid
from devyard.wire.ssh_keys import AuthorizedKey, AuthorizedKeys, SSHKeyCreate

__all__ = ["KEY_TYPES", "authorized_for_environment", "create", "delete", "parse_public_key", "runner_may_read_keys_of"]

KIND = "SSHKey"
KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)


def parse_public_key(text: str) -> tuple[str, str, str]:
    """(key type, normalized key, SHA256 fingerprint) of an OpenSSH public key line, or Invalid."""
    parts = text.strip().split()
    if len(parts) < 2:
        raise Invalid("the public key must look like 'ssh-ed25519 AAAA... comment' (one line of a .pub file)")
    key_type, data = parts[0], parts[1]
    if key_type not in KEY_TYPES:
        raise Invalid(f"key type {key_type!r} is not supported; use one of {', '.join(sorted(KEY_TYPES))}")
    try:
        blob = base64.b64decode(data, validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        embedded = blob[4 : 4 + length].decode()
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise Invalid("the public key's data is not valid base64 of an SSH key") from None
    if embedded != key_type:
        raise Invalid(f"the key says it is {key_type!r} but its data holds a {embedded!r} key")
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return key_type, f"{key_type} {data}" + (f" {' '.join(parts[2:])}" if len(parts) > 2 else ""), fingerprint


async def create(tx: resources.Tx, principal: Principal, body: SSHKeyCreate) -> ResourceRow:
    org_id = policy.creation_organization(principal, body.metadata.organization_id)
    policy.check_create(principal, KIND, org_id)
    key_type, normalized, fingerprint = parse_public_key(body.spec.public_key)
    existing = await tx.session.scalar(
        select(ResourceRow.id)
        .where(ResourceRow.kind == KIND, ResourceRow.user_id == principal.id)
        .where(ResourceRow.status["fingerprint"].as_string() == fingerprint)
    )
    if existing is not None:
        raise Conflict(f"you registered this key already ({existing})")
    row = resources.new_row(
        KIND,
        name=body.metadata.name or resources.name_from(fingerprint[7:19]),
        organization_id=org_id,
        creator_id=principal.id,
        spec={"public_key": normalized},
        status={"fingerprint": fingerprint, "key_type": key_type},
        labels=body.metadata.labels,
    )
    row.scope = principal.id  # key names are unique per user
    tx.create(row, details={"fingerprint": fingerprint})
    return row


async def delete(tx: resources.Tx, principal: Principal, key_id: str) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, KIND, key_id)
    tx.remove(row)
    return row


async def runner_may_read_keys_of(session: AsyncSession, runner_id: str, user_id: str) -> bool:
    """A runner reads a user's keys only while it holds one of that user's environments."""
    found = await session.scalar(
        select(ResourceRow.id)
        .where(ResourceRow.kind == "Environment", ResourceRow.runner_id == runner_id, ResourceRow.creator_id == user_id)
        .limit(1)
    )
    return found is not None


async def authorized_for_environment(session: AsyncSession, environment: ResourceRow) -> AuthorizedKeys:
    """The keys that open SSH sessions in ``environment``: its owner's (and, once environments are shared, those
    of the users it is shared with). The caller checked that the runner asking holds the environment."""
    rows = await session.scalars(
        select(ResourceRow)
        .where(ResourceRow.kind == KIND, ResourceRow.user_id == environment.creator_id)
        .order_by(ResourceRow.id)
    )
    keys = [
        AuthorizedKey(
            user_id=str(row.creator_id),
            fingerprint=str(row.status.get("fingerprint", "")),
            public_key=row.spec["public_key"],
        )
        for row in rows
    ]
    return AuthorizedKeys(environment_id=environment.id, keys=keys)
