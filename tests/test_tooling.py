"""The test plumbing's own contracts, checked by running pytest on small test files with ``tests/conftest.py``:
PostgreSQL starts only for tests that need it, ``DEVYARD_TEST_DATABASES`` picks the database kinds, and missing
PostgreSQL binaries skip those tests on a desk but fail them under ``CI=true``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
# Loading these takes a second per run, and the example tests use none of them.
_UNUSED_PLUGINS = ("-p", "no:schemathesis", "-p", "no:hypothesispytest", "-p", "no:anyio")

EXAMPLE = """
def test_without_a_database():
    pass


def test_with_a_database(database_url):
    assert database_url.startswith(("sqlite:///", "postgresql://"))
"""


def _outcome(result: subprocess.CompletedProcess[str], test: str) -> str:
    """PASSED, SKIPPED, ERROR... for ``test`` in verbose ``--setup-show`` output."""
    match = re.search(rf"::{re.escape(test)} .*?(PASSED|FAILED|SKIPPED|ERROR)", result.stdout, re.DOTALL)
    assert match, f"{test} did not run:\n{result.stdout}{result.stderr}"
    return match.group(1)


def _pytest(directory: Path, *args: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """Run pytest on ``directory``, which holds a copy of our conftest and one test file."""
    shutil.copy(TESTS / "conftest.py", directory / "conftest.py")
    (directory / "test_example.py").write_text(EXAMPLE)
    (directory / "pytest.ini").write_text(
        "[pytest]\naddopts = --strict-markers -p no:cacheprovider\nasyncio_default_fixture_loop_scope = function\n"
        "markers =\n    postgres: PostgreSQL\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DEVYARD_TEST_", "CI"))}
    env.update(environment, PYTHONPATH=str(TESTS))
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(directory), "-v", "--setup-show", *_UNUSED_PLUGINS, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=directory,
        check=False,
        timeout=120,
    )


def test_tests_without_a_database_do_not_start_postgres(tmp_path: Path) -> None:
    result = _pytest(tmp_path, "-k", "without or sqlite")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _outcome(result, "test_without_a_database") == "PASSED"
    assert _outcome(result, "test_with_a_database[sqlite]") == "PASSED"
    assert "postgres_server" not in result.stdout


def test_the_database_kinds_come_from_the_environment(tmp_path: Path) -> None:
    result = _pytest(tmp_path, DEVYARD_TEST_DATABASES="sqlite")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _outcome(result, "test_with_a_database[sqlite]") == "PASSED"
    assert "[postgresql]" not in result.stdout

    result = _pytest(tmp_path, DEVYARD_TEST_DATABASES="sqlite,oracle")
    assert result.returncode != 0
    assert "DEVYARD_TEST_DATABASES" in result.stderr


@pytest.mark.parametrize(("ci", "outcome"), [("", "SKIPPED"), ("true", "ERROR")])
def test_missing_postgres_binaries_skip_except_in_ci(tmp_path: Path, ci: str, outcome: str) -> None:
    empty = tmp_path / "no-postgres"
    empty.mkdir()
    result = _pytest(tmp_path, "-k", "postgresql", DEVYARD_TEST_POSTGRES_BINDIR=str(empty), CI=ci)
    assert _outcome(result, "test_with_a_database[postgresql]") == outcome
    assert (result.returncode == 0) == (outcome == "SKIPPED")
