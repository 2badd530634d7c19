"""Access to a running environment through its runner's gateway: the management plane's answer, and the ticket.

``POST /api/v1/environments/{id}/access`` (optionally with an ``AccessRequest`` body naming the scope) answers
``EnvironmentAccess``: the gateway's URL and a short-lived ticket that the management plane signed. An ``exec``
ticket opens one exec session on the gateway; a ``port`` ticket lets its holder through the runner's port proxy to
the environment's ports (as the user it names, any number of times until it expires), and is what the proxy's login
page takes from a browser. The user presents the ticket to the gateway (``Authorization: Bearer``);
the runner checks it with the key it got from ``GET /api/v1/runners/{id}/gateway-key`` (``GatewayKey``). The
management plane never talks to the runner, and the runner needs no round trip to check a ticket.

A ticket is ``<claims>.<signature>``: ``claims`` is the URL-safe base64 (no padding) of the JSON of
``TicketClaims``, ``signature`` the URL-safe base64 (no padding) of HMAC-SHA256 over the ``claims`` text with the
runner's gateway key. ``sign_ticket`` makes one (the server), ``verify_ticket`` checks one (the runner's gateway).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from devyard.wire.meta import ReadModel, WriteModel

__all__ = [
    "TICKET_SCOPES",
    "AccessRequest",
    "EnvironmentAccess",
    "ExecStart",
    "GatewayKey",
    "TicketClaims",
    "TicketError",
    "TicketScope",
    "decode_key",
    "encode_key",
    "sign_ticket",
    "verify_ticket",
]

#: What a ticket may be used for: ``exec`` opens processes in the environment, ``port`` reaches its ports through
#: the runner's port proxy.
TICKET_SCOPES: Final = ("exec", "port")
TicketScope = Literal["exec", "port"]
#: A ticket longer than this is refused before it is decoded.
_MAX_TICKET_LENGTH: Final = 2048


class AccessRequest(WriteModel):
    """The body of ``POST /api/v1/environments/{id}/access``; none at all asks for an exec ticket."""

    scope: TicketScope = "exec"


class EnvironmentAccess(ReadModel):
    """The answer to ``POST /api/v1/environments/{id}/access``."""

    #: The runner's gateway, e.g. ``http://runner-1.example.com:7481``.
    gateway_url: str
    environment_id: str
    #: Present it as ``Authorization: Bearer <ticket>`` to the gateway before ``expires_at``.
    ticket: str
    expires_at: datetime
    scope: TicketScope = "exec"


class GatewayKey(ReadModel):
    """The answer to ``GET /api/v1/runners/{id}/gateway-key``: the key that runner checks tickets with."""

    runner_id: str
    algorithm: Literal["HS256"] = "HS256"
    #: URL-safe base64 of the key's bytes (``decode_key``).
    key: str


class ExecStart(WriteModel):
    """The first message on a gateway's exec WebSocket (a text frame): what to run. The gateway's module
    docstring (``devyard.runner.gateway``) describes the rest of the protocol."""

    argv: list[str] = Field(min_length=1, max_length=4096)
    #: Added to (and overriding) the environment's variables.
    env: dict[str, str] = Field(default_factory=dict)
    tty: bool = False
    #: The terminal's ``[rows, columns]``, with ``tty``.
    size: tuple[int, int] | None = None
    #: The working directory inside; default: the environment's.
    cwd: str | None = None
    #: ``user``, ``uid`` or ``uid:gid`` inside; default: the environment's.
    user: str | None = None


class TicketClaims(BaseModel):
    """What a ticket says: who may do what in which environment on which runner, until when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment_id: str = Field(min_length=1, max_length=64)
    user_id: str = Field(min_length=1, max_length=64)
    runner_id: str = Field(min_length=1, max_length=64)
    scope: TicketScope
    #: The user's organization that the environment belongs to (port tickets: admission by organization).
    organization_id: str | None = Field(default=None, max_length=64)
    #: Expiry, seconds since the epoch.
    exp: int
    #: Random: two tickets are never equal.
    nonce: str = Field(min_length=8, max_length=64)


class TicketError(Exception):
    """A ticket that must be refused; the message says why, and may be shown to its holder."""


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def decode_key(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text.encode())
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"a gateway key is URL-safe base64: {exc}") from None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, payload: str) -> bytes:
    return hmac.new(key, payload.encode(), hashlib.sha256).digest()


def sign_ticket(claims: TicketClaims, key: bytes) -> str:
    payload = _b64(json.dumps(claims.model_dump(mode="json"), separators=(",", ":"), sort_keys=True).encode())
    return f"{payload}.{_b64(_signature(key, payload))}"


def verify_ticket(ticket: str, key: bytes, *, now: float, scope: TicketScope = "exec") -> TicketClaims:
    """The ticket's claims if ``key`` signed it for ``scope`` and it has not expired at ``now`` (epoch seconds);
    else ``TicketError``. The caller still checks that the claims name what is being asked for."""
    if len(ticket) > _MAX_TICKET_LENGTH:
        raise TicketError("the ticket is too long to be one the management plane issued")
    payload, separator, signature = ticket.partition(".")
    if not separator or not payload or not signature:
        raise TicketError("the ticket is malformed: ask the management plane for a new one")
    try:
        given = _unb64(signature)
    except (binascii.Error, ValueError):
        raise TicketError("the ticket's signature is malformed") from None
    if not hmac.compare_digest(given, _signature(key, payload)):
        raise TicketError("the ticket's signature is not valid for this runner")
    try:
        claims = TicketClaims.model_validate(json.loads(_unb64(payload)))
    except (binascii.Error, ValueError, ValidationError):
        raise TicketError("the ticket's claims are malformed") from None
    if claims.scope != scope:
        raise TicketError(
            f"the ticket is for {claims.scope}, not {scope}: ask the management plane for a {scope} ticket"
        )
    if claims.exp <= now:
        raise TicketError("the ticket expired: ask the management plane for a new one")
    return claims
