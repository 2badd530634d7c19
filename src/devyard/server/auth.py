"""Credentials and principals: who is calling.

Bearer credentials are random secrets with a type prefix (``dyu_`` a user's token, ``dyr_`` a runner's
credential, ``dyx_`` a one-time runner exchange token). Only their SHA-256 is stored: the secrets are 256-bit
random, so a slow hash would add nothing. Called by the API's dependency that authenticates each request.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from devyard.server.database.tables import CredentialRow, ResourceRow
from devyard.server.store import resources
from devyard.server.store.errors import Unauthenticated

__all__ = [
    "CredentialCache",
    "Principal",
    "authenticate",
    "hash_secret",
    "issue_credential",
    "new_credential",
    "new_secret",
]

_PREFIXES = {"user": "dyu_", "runner": "dyr_", "exchange": "dyx_"}


def new_secret(principal_type: str) -> str:
    return _PREFIXES[principal_type] + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    type: str  # "user" | "runner"
    id: str
    name: str
    credential_id: str
    #: For users: organization id -> role ("admin" | "member").
    roles: dict[str, str] = field(default_factory=dict)
    #: For runners: the organization the runner belongs to.
    organization_id: str | None = None

    @property
    def is_user(self) -> bool:
        return self.type == "user"

    @property
    def is_runner(self) -> bool:
        return self.type == "runner"

    def is_admin_of(self, organization_id: str | None) -> bool:
        return self.is_user and organization_id is not None and self.roles.get(organization_id) == "admin"

    def is_member_of(self, organization_id: str | None) -> bool:
        return self.is_user and organization_id is not None and organization_id in self.roles

    @property
    def organization_ids(self) -> list[str]:
        if self.is_runner:
            return [self.organization_id] if self.organization_id else []
        return sorted(self.roles)

    @property
    def admin_organization_ids(self) -> list[str]:
        return sorted(org for org, role in self.roles.items() if role == "admin")

    def actor(self, source_ip: str | None = None, user_agent: str | None = None) -> resources.Actor:
        return resources.Actor(self.type, self.id, source_ip, user_agent)


def new_credential(
    principal_type: str,
    *,
    token_id: str,
    subject_id: str,
    expires_at: datetime | None,
    secret: str | None = None,
) -> tuple[str, CredentialRow]:
    """A new credential: its secret (shown once, never stored; made here unless the caller proposes one) and the
    row that keeps only its hash."""
    secret = secret or new_secret(principal_type)
    row = CredentialRow(
        hash=hash_secret(secret),
        principal_type=principal_type,
        token_id=token_id,
        subject_id=subject_id,
        created_at=resources.utcnow(),
        expires_at=expires_at,
        revoked_at=None,
    )
    return secret, row


def issue_credential(
    session: AsyncSession,
    principal_type: str,
    *,
    token_id: str,
    subject_id: str,
    expires_at: datetime | None,
    secret: str | None = None,
) -> str:
    """Add a credential to the session; returns its secret."""
    secret, row = new_credential(
        principal_type, token_id=token_id, subject_id=subject_id, expires_at=expires_at, secret=secret
    )
    session.add(row)
    return secret


class CredentialCache:
    """Principals by credential hash for a few seconds, so that a request costs no extra query.

    A revocation through this process drops the entry at once; other replicas notice within ``ttl``.
    """

    def __init__(self, ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._entries.pop(digest, None)
            return None
        return entry[1]

    def put(self, digest: str, principal: Principal) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (time.monotonic() + self.ttl, principal)

    def forget_subject(self, subject_id: str) -> None:
        for digest, (_, principal) in list(self._entries.items()):
            if subject_id in (principal.id, principal.credential_id):
                self._entries.pop(digest, None)

    def clear(self) -> None:
        self._entries.clear()


async def authenticate(session: AsyncSession, secret: str, cache: CredentialCache) -> Principal:
    """The principal a bearer secret belongs to, or Unauthenticated saying why not."""
    digest = hash_secret(secret)
    cached = cache.get(digest)
    if cached is not None:
        return cached
    credential = await session.get(CredentialRow, digest)
    if credential is None:
        raise Unauthenticated("the credential is not valid: unknown token")
    now = resources.utcnow()
    if credential.revoked_at is not None:
        raise Unauthenticated("the credential is not valid: the token was revoked")
    if credential.expires_at is not None and credential.expires_at <= now:
        raise Unauthenticated("the credential is not valid: the token expired")
    if credential.principal_type == "exchange":
        raise Unauthenticated(
            "this is a runner exchange token: trade it for a credential at POST /api/v1/runners/exchange"
        )
    subject = await session.get(ResourceRow, credential.subject_id)
    if subject is None:
        raise Unauthenticated("the credential is not valid: its owner no longer exists")
    if credential.principal_type == "runner":
        principal = Principal(
            "runner", subject.id, subject.name, credential.token_id, organization_id=subject.organization_id
        )
    else:
        if subject.status.get("suspended"):
            raise Unauthenticated("the credential is not valid: the user is suspended")
        memberships = await session.scalars(
            select(ResourceRow).where(ResourceRow.kind == "Membership", ResourceRow.user_id == subject.id)
        )
        roles = {m.organization_id: str(m.spec["role"]) for m in memberships if m.organization_id}
        principal = Principal("user", subject.id, subject.name, credential.token_id, roles=roles)
    cache.put(digest, principal)
    return principal
