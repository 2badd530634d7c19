"""Token: a personal access token. Stored hashed; its secret is shown once, when it is made."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from devyard.wire.meta import MetadataWrite, ReadModel, Resource, WriteModel

__all__ = ["Token", "TokenCreate", "TokenCreated", "TokenSpec", "TokenStatus"]


class TokenSpec(WriteModel):
    description: str = Field(default="", max_length=500)
    #: None never expires.
    expires_at: datetime | None = None
    #: An administrator may make a token for another user of the organization; default: the caller.
    user_id: str | None = None


class TokenStatus(ReadModel):
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    #: The first characters of the secret, to tell tokens apart.
    prefix: str = ""


class Token(Resource[TokenSpec, TokenStatus]):
    kind: str = "Token"


class TokenCreate(WriteModel):
    metadata: MetadataWrite = Field(default_factory=MetadataWrite)
    spec: TokenSpec = Field(default_factory=TokenSpec)


class TokenCreated(ReadModel):
    token: Token
    #: The secret: shown here once, stored only as a hash.
    secret: str
