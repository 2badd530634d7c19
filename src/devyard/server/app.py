"""The management plane's ASGI app and its process: ``create_app(settings)`` and ``serve(settings)``.

Called by ``devyard server``, by ``devyard up``'s local daemon, and by tests (in-process, with uvicorn).
The lifespan migrates the database, bootstraps an empty one, and runs the change feed and control loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import devyard
from devyard.server import bootstrap, loops
from devyard.server.api import (
    audit,
    catalog,
    environments,
    logs,
    organizations,
    runners,
    secrets,
    ssh_keys,
    tokens,
)
from devyard.server.api.context import error_response, install_error_handlers
from devyard.server.api.responses import JSONResponse
from devyard.server.database import migrate
from devyard.server.database.engine import Database
from devyard.server.group_commit import GroupCommit
from devyard.server.settings import ServerSettings
from devyard.server.state import SecretBox, ServerState, load_secret_key
from devyard.server.watch import ChangeFeed

__all__ = ["app_from_environment", "create_app", "serve"]

log = logging.getLogger(__name__)


def create_app(settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(Path(settings.state_dir).mkdir, parents=True, exist_ok=True, mode=0o700)
        database = Database(settings.database_url())
        await migrate.upgrade(database)
        feed = ChangeFeed(database, poll_interval=settings.watch_poll_interval)
        await feed.start()
        state = ServerState(settings, database, feed, SecretBox(load_secret_key(settings)))
        app.state.devyard = state
        await bootstrap.check_secret_key(state)
        await bootstrap.bootstrap(state)
        group_commit = state.group_commit = GroupCommit(state)
        group_commit.start()
        tasks = [asyncio.create_task(feed.run(), name="change-feed")]
        if settings.run_loops:
            tasks.append(asyncio.create_task(loops.run(state), name="control-loops"))
        try:
            yield
        finally:
            await group_commit.stop()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await database.dispose()

    app = FastAPI(
        title="devyard",
        version=devyard.__version__,
        summary="The management plane of devyard: development environments on your own runners.",
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry is on by default and costs about a third of a request's time.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    install_error_handlers(app)

    app.add_middleware(_RequestGuard, max_body_bytes=settings.max_body_bytes)

    for module in (organizations, tokens, runners, catalog, environments, logs, secrets, ssh_keys, audit):
        app.include_router(module.router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": devyard.__version__}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> Any:
        try:
            await request.app.state.devyard.database.ping()
        except Exception as exc:
            return error_response(503, "unavailable", f"the database is not reachable: {exc}")
        return JSONResponse({"status": "ready"})

    return app


#: A JSON string escape for NUL: ``\\u0000`` not itself escaped (preceded by an even number of backslashes).
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


class _RequestGuard:
    """Refuses, before any route runs, what no route could answer well: a body over ``max_body_bytes`` (413,
    counted as it streams in, so a body without Content-Length is held to it too), a body that is not JSON
    (415), and NUL characters in the path, query or body (400: PostgreSQL cannot store them in text, and
    no id, name or label holds one). The body is read here, at most ``max_body_bytes`` of it, and handed on.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._check_head(scope)
        body = b""
        if refusal is None:
            body, refusal = await self._read_body(scope, receive)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        handed_on = False

        async def replay() -> Message:
            nonlocal handed_on
            if not handed_on:
                handed_on = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_head(self, scope: Scope) -> Response | None:
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            return error_response(400, "bad_request", "the path or query holds a NUL character (%00)")
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_body_bytes
            except ValueError:
                return error_response(400, "bad_request", "Content-Length is not a number")
            if too_large:
                return self._too_large()
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, Response | None]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not body:
            return body, None
        media_type = Headers(scope=scope).get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not (
            media_type.startswith("application/") and media_type.endswith("+json")
        ):
            shown = media_type or "none"
            return body, error_response(
                415, "unsupported_media_type", f"the body must be JSON (Content-Type: application/json), not {shown}"
            )
        if _NUL_ESCAPE.search(body):
            return body, error_response(400, "bad_request", "the body holds a NUL character (\\u0000) in a string")
        return body, None

    def _too_large(self) -> Response:
        return error_response(413, "payload_too_large", f"the body is larger than {self.max_body_bytes} bytes")


def app_from_environment() -> FastAPI:
    """The app with settings from ``DEVYARD_SERVER_*`` variables: what each worker process of
    ``serve(workers=N)`` runs."""
    return create_app(ServerSettings())


def serve(settings: ServerSettings, *, log_level: str = "info") -> None:
    """Run the management plane until SIGINT or SIGTERM."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = settings.host_port()
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    if settings.workers > 1:
        if settings.is_sqlite():
            raise ValueError(
                "several workers need PostgreSQL (--database postgresql://...): SQLite has one writer, and "
                "workers would see each other's changes only through its one-second poll"
            )
        # The workers are new processes: they read the settings back from the environment.
        for name, value in settings.model_dump(mode="json").items():
            if value is not None:
                os.environ[f"DEVYARD_SERVER_{name.upper()}"] = str(value)
        uvicorn.run(
            "devyard.server.app:app_from_environment",
            factory=True,
            host=host,
            port=port,
            workers=settings.workers,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=3,
            access_log=os.environ.get("DEVYARD_ACCESS_LOG") == "1",
        )
        return
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=3,
        access_log=os.environ.get("DEVYARD_ACCESS_LOG") == "1",
    )
    uvicorn.Server(config).run()
