"""``devyard --help`` must start fast: the command's modules import no heavy library until a command runs.

Wall-clock time is never asserted here (``bench/cli_start.py`` measures it); what makes it fast is: which
modules get imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from devyard.cli.main import LAZY_COMMANDS

from .conftest import Cli

HEAVY = [
    "httpx",
    "rich",
    "pydantic",
    "fastapi",
    "sqlalchemy",
    "uvicorn",
    "devyard.server",
    "devyard.runner",
    "devyard.client",
]


def _imported_after(code: str) -> list[str]:
    """The HEAVY modules that are in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(output.splitlines()[-1])
    return [name for name in HEAVY if name in loaded]


def test_importing_the_cli_loads_no_heavy_module() -> None:
    assert _imported_after("import devyard.cli.main") == []


def test_help_of_every_command_loads_no_heavy_module() -> None:
    # What `devyard <command> --help` imports: every command's module, through the lazy group.
    code = (
        "import click\n"
        "from devyard.cli.main import cli, LAZY_COMMANDS\n"
        "ctx = click.Context(cli)\n"
        "for name in LAZY_COMMANDS:\n"
        "    command = cli.get_command(ctx, name)\n"
        "    command.get_help(click.Context(command, info_name=name))\n"
    )
    assert _imported_after(code) == []


def test_help_lists_every_command(cli: Cli) -> None:
    result = cli("--help")
    for name, (_, short_help) in LAZY_COMMANDS.items():
        assert name in result.stdout
        assert short_help.split()[0] in result.stdout


@pytest.mark.parametrize("name", list(LAZY_COMMANDS))
def test_every_command_loads_and_has_help(cli: Cli, name: str) -> None:
    result = cli(name, "--help")
    assert result.stdout.startswith("Usage: devyard " + name)


def _every_command() -> list[tuple[str, click.Command]]:
    from devyard.cli.main import cli

    found: list[tuple[str, click.Command]] = []
    context = click.Context(cli)
    for name in LAZY_COMMANDS:
        command = cli.get_command(context, name)
        assert command is not None
        found.append((name, command))
        if isinstance(command, click.Group):
            found.extend((f"{name} {sub}", each) for sub, each in command.commands.items())
    return found


def test_every_command_that_answers_takes_output_json() -> None:
    # The two long-running processes log instead of answering; a group only dispatches.
    processes = {"server", "runner"}
    missing = [
        path
        for path, command in _every_command()
        if path not in processes
        and not isinstance(command, click.Group)
        and "--output" not in {o for p in command.params for o in getattr(p, "opts", [])}
    ]
    assert missing == []


def test_no_command_has_an_option_twice() -> None:
    for path, command in _every_command():
        options = [option for param in command.params for option in getattr(param, "opts", [])]
        assert len(options) == len(set(options)), path


def test_version(cli: Cli) -> None:
    import devyard

    assert devyard.__version__ in cli("--version").stdout


def test_an_unknown_command_is_a_usage_error(cli: Cli) -> None:
    result = cli("nonsense", ok=False)
    assert result.returncode == 2
    assert "No such command 'nonsense'" in result.stderr


def test_probe_is_sound() -> None:
    """The probe would see a heavy import if there were one."""
    assert "pydantic" in _imported_after("import pydantic")
