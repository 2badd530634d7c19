"""Fixtures every test may use: databases on SQLite and PostgreSQL, and the live management plane.

- ``database_url``: a fresh, empty database for the test, once per database kind: ``sqlite:///<tmp>/devyard.db``
  and ``postgresql://postgres@127.0.0.1:PORT/test_N`` (marked ``postgres``). The kinds come from
  ``--databases`` or ``DEVYARD_TEST_DATABASES`` (default ``sqlite,postgresql``).
- ``postgres_server``: one real PostgreSQL server for the session (``support.postgres``), started the first time
  a test needs it. Where its binaries are missing, PostgreSQL tests are skipped, or fail when ``CI=true``.
- ``server_settings`` -> ``server`` -> ``admin_client``: the real app in a thread of this process on a free port
  (``support.live_server``) over ``database_url``. Override ``server_settings`` in a module to change settings.

Called by pytest. ``tests/`` is on ``sys.path`` (it is not a package), so tests import ``support.*``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devyard.client import Client
from devyard.server.settings import ServerSettings
from support import databases, host, live_server, postgres
from support import images as images_support
from support import registry as registry_support


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--databases",
        default=os.environ.get("DEVYARD_TEST_DATABASES", ",".join(databases.KINDS)),
        help="Comma-separated database kinds that database tests run on (default: $DEVYARD_TEST_DATABASES "
        "or sqlite,postgresql).",
    )


def pytest_configure(config: pytest.Config) -> None:
    databases.selected(config)  # a typo fails the run now, not as a missing parameter later
    # A developer's shell may point the CLI at a real server, or change the server's or runner's settings
    # (DEVYARD_SERVER, DEVYARD_TOKEN, DEVYARD_SERVER_*, DEVYARD_RUNNER_*...): no test may see them. Only the
    # test suite's own knobs, DEVYARD_TEST_*, pass.
    for name in list(os.environ):
        if name.startswith("DEVYARD_") and not name.startswith("DEVYARD_TEST_"):
            del os.environ[name]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_kind" in metafunc.fixturenames:
        metafunc.parametrize("database_kind", databases.params(metafunc.config))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    try:
        bindir = postgres.find_bindir()
    except postgres.PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true and PostgreSQL is missing: {exc}", pytrace=False)
        pytest.skip(f"{exc} (set DEVYARD_TEST_DATABASES=sqlite to run SQLite only)")
    with postgres.running_postgres(bindir) as server:
        yield server


@pytest.fixture
def database_url(database_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh empty database, as a URL for ``ServerSettings.database``; one test per kind."""
    with databases.fresh_database(database_kind, request, tmp_path) as url:
        yield url


@pytest.fixture
def server_settings(database_url: str, tmp_path: Path) -> ServerSettings:
    return live_server.settings_for(tmp_path / "server", database_url)


@pytest.fixture
def server(server_settings: ServerSettings) -> Iterator[live_server.LiveServer]:
    """The real management plane, running in this process on a free port; stopped after the test."""
    with live_server.serve_in_thread(server_settings) as live:
        yield live


@pytest.fixture
def admin_client(server: live_server.LiveServer) -> Iterator[Client]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry_support.RegistryServer]:
    """A real OCI registry (Debian's docker-registry) on 127.0.0.1:<free port>, open, plain http, for the
    session; ``registry.host`` is what references and ``insecure`` sets use."""
    host.require("docker-registry")
    with registry_support.running_registry(tmp_path_factory.mktemp("registry")) as (server, _):
        yield server


@pytest.fixture(scope="session")
def busybox_image(registry: registry_support.RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox test image (``support.images.busybox_layout``) pushed to ``registry``: its reference,
    ``127.0.0.1:PORT/test/busybox:1``."""
    layout = images_support.busybox_layout(tmp_path_factory.mktemp("busybox-layout"))
    return images_support.push(layout, registry.host, "test/busybox:1")


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry_support.RegistryServer]:
    """A second real registry, which wants a password (basic auth; the users are ``registry_support.USERS``)."""
    host.require("docker-registry")
    with registry_support.running_registry(tmp_path_factory.mktemp("basic-registry"), auth="basic") as (server, _):
        yield server


@pytest.fixture(scope="session")
def basic_image(basic_registry: registry_support.RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox test image pushed to ``basic_registry`` (as alice): its reference."""
    layout = images_support.busybox_layout(tmp_path_factory.mktemp("basic-layout"))
    alice = {basic_registry.host: ("alice", registry_support.USERS["alice"])}
    return images_support.push(layout, basic_registry.host, "private/busybox:1", credentials=alice)
