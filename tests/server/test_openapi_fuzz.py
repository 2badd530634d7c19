"""Fuzzing the API from its own ``/openapi.json`` with schemathesis: no request, valid or not, gets a 5xx, and
every answer is one the document promises (status, content type, body schema).

Every operation gets a bounded number of generated requests, positive (what the schema allows) and negative
(what it does not), derandomized so that a run is reproducible; once as the organization's admin, once as a
member. The live server runs in this process (``support.live_server``) on SQLite only: the document and the
validation are the same on both databases, and ``test_bad_input`` runs the database-specific edge cases (NUL
characters, over-long text) on PostgreSQL too; doubling the fuzzing would double its time for little gain.

A watch (``watch=true`` with a usable ``resource_version``) answers a stream that lasts until the client
leaves, in a media type (``application/x-ndjson``) the document does not describe: the query hook turns such
a request into a plain list, so that watch's parameters are still fuzzed on their error paths
(``test_watch`` covers the stream).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from devyard.server.app import create_app
from devyard.server.settings import ServerSettings
from support import live_server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: Generated requests per operation and principal: about 55 operations x 2 principals x this.
MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[live_server.LiveServer]:
    state_dir: Path = tmp_path_factory.mktemp("openapi-fuzz")
    with live_server.serve_in_thread(live_server.settings_for(state_dir, heartbeat_timeout=3600.0)) as server:
        yield server


@pytest.fixture(scope="module")
def credentials(fuzzed_server: live_server.LiveServer) -> dict[str, str]:
    with fuzzed_server.client() as admin:
        user = admin.post("/api/v1/users", {"metadata": {"name": "fuzzed-member"}})
        member = admin.post("/api/v1/tokens", {"spec": {"user_id": user["metadata"]["id"]}})
        # Something to find, so that reads and writes do not all answer 404.
        admin.post("/api/v1/projects", {"spec": {"repository": "https://example.com/fuzz.git"}})
        admin.post("/api/v1/environment-classes", {"metadata": {"name": "fuzz"}})
    return {"admin": fuzzed_server.admin_token, "member": member["secret"]}


def _no_streaming(query: dict[str, Any] | None) -> dict[str, Any] | None:
    if not query or str(query.get("watch")).lower() not in ("true", "1", "yes", "on"):
        return query
    version = query.get("resource_version")
    if isinstance(version, str) and version.isdigit() and len(version) <= 30:
        return {key: value for key, value in query.items() if key != "watch"}
    return query


def _document() -> dict[str, Any]:
    # The app's document needs no database: create_app touches nothing until its lifespan starts.
    return create_app(ServerSettings(state_dir=Path("/nonexistent"))).openapi()


# Loaded at import, not from a fixture: schemathesis.pytest.from_fixture (4.32) sets Function._nodeid, which
# pytest 9 no longer has. test_the_fuzzed_document_is_the_live_servers checks that it is the one served.
schema = schemathesis.openapi.from_dict(_document())


@schema.hook
def map_query(_context: Any, query: dict[str, Any] | None) -> dict[str, Any] | None:
    return _no_streaming(query)


@pytest.fixture(params=["admin", "member"])
def principal(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_gets_a_server_error(
    case: Any, principal: str, credentials: dict[str, str], fuzzed_server: live_server.LiveServer
) -> None:
    case.call_and_validate(
        base_url=fuzzed_server.url,
        headers={"Authorization": f"Bearer {credentials[principal]}"},
        checks=CHECKS,
        timeout=10,
    )


def test_the_fuzzed_document_is_the_live_servers(fuzzed_server: live_server.LiveServer) -> None:
    assert httpx.get(f"{fuzzed_server.url}/openapi.json").json() == _document()
