"""The management plane's ASGI app and its process: ``create_app(settings)`` and ``serve(settings)``.

Called by ``devyard server``, by ``devyard up``'s local daemon, and by tests (in-process, with uvicorn).
The lifespan migrates the database, bootstraps an empty one, and runs the change feed and control loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

import devyard
from devyard.server import bootstrap, loops
from devyard.server.api import audit, catalog, environments, organizations, runners, secrets, ssh_keys, tokens
from devyard.server.api.context import error_response, install_error_handlers
from devyard.server.database import migrate
from devyard.server.database.engine import Database
from devyard.server.settings import ServerSettings
from devyard.server.state import SecretBox, ServerState, load_secret_key
from devyard.server.watch import ChangeFeed

__all__ = ["create_app", "serve"]

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
        await bootstrap.bootstrap(state)
        tasks = [asyncio.create_task(feed.run(), name="change-feed")]
        if settings.run_loops:
            tasks.append(asyncio.create_task(loops.run(state), name="control-loops"))
        try:
            yield
        finally:
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
    )
    install_error_handlers(app)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_large = int(length) > settings.max_body_bytes
            except ValueError:
                return error_response(400, "bad_request", "Content-Length is not a number")
            if too_large:
                return error_response(
                    413, "payload_too_large", f"the body is larger than {settings.max_body_bytes} bytes"
                )
        return await call_next(request)

    for module in (organizations, tokens, runners, catalog, environments, secrets, ssh_keys, audit):
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


def serve(settings: ServerSettings, *, log_level: str = "info") -> None:
    """Run the management plane until SIGINT or SIGTERM."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = settings.host_port()
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
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
