"""Fixtures for server tests that share one live server per module and database.

- ``module_database_kind``: a module-scoped parameter over the database kinds that ``--databases`` selects
  (``support.databases``; ``database_kind`` of ``tests/conftest.py`` is per test, so a module-scoped fixture
  cannot use it).
- ``module_server``: the real management plane over a fresh database of that kind, started once for the
  module; a module may set ``SERVER_SETTINGS = {...}`` to override settings (``support.live_server.settings_for``).

For modules with hundreds of cases, such as the authorization matrix, where a server per test would
dominate the run time. Tests that need a pristine database use ``server`` from ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support import databases, live_server


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "module_database_kind" in metafunc.fixturenames:
        metafunc.parametrize("module_database_kind", databases.params(metafunc.config), scope="module")


@pytest.fixture(scope="module")
def module_server(
    module_database_kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[live_server.LiveServer]:
    state_dir = tmp_path_factory.mktemp(f"{request.module.__name__.rsplit('.', 1)[-1]}-{module_database_kind}")
    overrides = getattr(request.module, "SERVER_SETTINGS", {})
    with databases.fresh_database(module_database_kind, request, state_dir) as url:
        settings = live_server.settings_for(state_dir, url, **overrides)
        with live_server.serve_in_thread(settings) as server:
            yield server
