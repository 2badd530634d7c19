"""Resource ids: a type prefix and a sortable unique part (``env_01jh...``).

The unique part is a ULID in lower-case Crockford base32: 48 bits of milliseconds and 80 random bits, so ids
sort by creation time, which list paging relies on.
"""

from __future__ import annotations

import os
import re
import time
from typing import Final, NewType

__all__ = [
    "PREFIXES",
    "AuditEventId",
    "EnvironmentClassId",
    "EnvironmentId",
    "MembershipId",
    "OrganizationId",
    "ProjectId",
    "RunnerId",
    "SSHKeyId",
    "SecretId",
    "TokenId",
    "UserId",
    "kind_of",
    "new_id",
]

OrganizationId = NewType("OrganizationId", str)
UserId = NewType("UserId", str)
MembershipId = NewType("MembershipId", str)
TokenId = NewType("TokenId", str)
RunnerId = NewType("RunnerId", str)
EnvironmentClassId = NewType("EnvironmentClassId", str)
ProjectId = NewType("ProjectId", str)
EnvironmentId = NewType("EnvironmentId", str)
SecretId = NewType("SecretId", str)
SSHKeyId = NewType("SSHKeyId", str)
AuditEventId = NewType("AuditEventId", str)

#: kind name -> id prefix
PREFIXES: Final[dict[str, str]] = {
    "Organization": "org",
    "User": "usr",
    "Membership": "mem",
    "Token": "tok",
    "Runner": "run",
    "EnvironmentClass": "cls",
    "Project": "prj",
    "Environment": "env",
    "Secret": "sec",
    "SSHKey": "key",
    "AuditEvent": "aud",
}
_KINDS_BY_PREFIX: Final = {prefix: kind for kind, prefix in PREFIXES.items()}
_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"
_ID_RE: Final = re.compile(r"^([a-z]{3})_([0-9a-hjkmnp-tv-z]{26})$")


def new_id(kind: str) -> str:
    """A new id for a resource of ``kind``."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{PREFIXES[kind]}_{''.join(reversed(chars))}"


def kind_of(resource_id: str) -> str | None:
    """The kind an id names, or None when it is not a well-formed devyard id."""
    match = _ID_RE.match(resource_id)
    if match is None:
        return None
    return _KINDS_BY_PREFIX.get(match.group(1))
