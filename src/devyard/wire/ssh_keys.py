"""SSHKey: a user's public key, which the runners' SSH gateways accept for the user's environments."""

from __future__ import annotations

from pydantic import Field

from devyard.wire.meta import Condition, MetadataWrite, ReadModel, Resource, WriteModel

__all__ = ["AuthorizedKey", "AuthorizedKeys", "SSHKey", "SSHKeyCreate", "SSHKeySpec", "SSHKeyStatus"]


class SSHKeySpec(WriteModel):
    public_key: str = Field(min_length=1, max_length=16 * 1024)


class SSHKeyStatus(ReadModel):
    fingerprint: str = ""
    key_type: str = ""
    conditions: list[Condition] = Field(default_factory=list)


class SSHKey(Resource[SSHKeySpec, SSHKeyStatus]):
    kind: str = "SSHKey"


class SSHKeyCreate(WriteModel):
    metadata: MetadataWrite = Field(default_factory=MetadataWrite)
    spec: SSHKeySpec


class AuthorizedKey(ReadModel):
    """A public key that may open SSH sessions in one environment, and whose it is."""

    user_id: str
    fingerprint: str
    public_key: str


class AuthorizedKeys(ReadModel):
    """``GET /api/v1/environments/{id}/authorized-keys``: what the runner's SSH gateway accepts for that
    environment (today the keys of its owner), for the runner the environment is assigned to only."""

    environment_id: str
    keys: list[AuthorizedKey] = Field(default_factory=list)
