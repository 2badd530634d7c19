"""Per-request context for routes: the authenticated principal, transactions, and the error envelope.

Every route depends on ``context`` (authenticated) or ``anonymous``; both come from here, as do the
exception handlers that turn every failure into ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from devyard.server import auth
from devyard.server.api.responses import JSONResponse
from devyard.server.state import ServerState
from devyard.server.store import resources
from devyard.server.store.errors import StaleWrite, StoreError, Unauthenticated

__all__ = ["Context", "anonymous", "context", "error_response", "install_error_handlers"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Writes of these kinds may give the scheduler something to do.
_SCHEDULING_KINDS = frozenset({"Environment", "Runner", "EnvironmentClass"})

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "too_many_requests",
    503: "unavailable",
}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "details": details}}, status_code=status, headers=headers
    )


@dataclass
class Context:
    state: ServerState
    principal: auth.Principal
    actor: resources.Actor

    @asynccontextmanager
    async def write(self) -> AsyncIterator[resources.Tx]:
        """A write transaction; its changes are committed, announced to watchers and the scheduler."""
        async with self.state.database.write() as session:
            tx = resources.Tx(session, self.actor)
            yield tx
            await tx.commit()
        if tx.last_revision is not None:
            self.state.feed.wake()
            if tx.kinds & _SCHEDULING_KINDS:
                self.state.schedule_soon.set()

    async def transact(self, work: Callable[[resources.Tx], Awaitable[T]], *, retry: bool = True) -> T:
        """Run ``work`` in a write transaction, again (up to 3 times) when a concurrent write got there first,
        unless the caller pinned a resource_version (then the 409 is the answer)."""
        attempts = 3 if retry else 1
        for attempt in range(attempts):
            try:
                async with self.write() as tx:
                    return await work(tx)
            except StaleWrite:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.devyard
    return state


def _actor_fields(request: Request) -> tuple[str | None, str | None]:
    client = request.client.host if request.client else None
    return client, request.headers.get("user-agent")


async def context(request: Request) -> Context:
    """Authenticate the request's bearer token."""
    state = _state(request)
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated("no credentials: send 'Authorization: Bearer <token>'")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    async with state.database.read() as session:
        principal = await auth.authenticate(session, secret.strip(), state.credentials)
    source_ip, user_agent = _actor_fields(request)
    return Context(state, principal, principal.actor(source_ip, user_agent))


@dataclass
class Anonymous:
    state: ServerState
    actor: resources.Actor


async def anonymous(request: Request) -> Anonymous:
    source_ip, user_agent = _actor_fields(request)
    return Anonymous(_state(request), resources.Actor("anonymous", None, source_ip, user_agent))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StoreError)
    async def _store_error(_request: Request, exc: StoreError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}
            for error in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in details[:5])
        return error_response(422, "validation_failed", f"the request is not valid: {summary}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal", "the server failed unexpectedly; the error is in its log")
