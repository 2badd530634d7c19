"""``devyard --help`` must start fast: the command's modules import no heavy library until a command runs.

Wall-clock time is never asserted here (``bench/cli_start.py`` measures it); what makes it fast is: which
modules get imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


#: What ``env create --image REF -- CMD`` and ``env exec ENV -- CMD`` do not import: HEAVY but the client, the other
#: ``env`` subcommands' modules (ports' subprocess and shutil with them), pathlib (the config file is read without
#: it), random (retries only), base64 (binascii does), and what only the other clients need.
NOT_ON_THE_RUN_PATH = [
    *(name for name in HEAVY if name != "devyard.client"),
    "devyard.cli.logs",
    "devyard.cli.ports",
    "devyard.cli.ssh",
    "subprocess",
    "shutil",
    "pathlib",
    "random",
    "base64",
    "asyncio",
    "ssl",
    "email",
    "http.client",
    "websockets",
    "devyard.wire.environments",
    "devyard.wire.meta",
]


def _imported_after(code: str, names: list[str] = HEAVY, env: dict[str, str] | None = None) -> list[str]:
    """The modules of ``names`` that are in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env).stdout
    loaded = json.loads(output.splitlines()[-1])
    return [name for name in names if name in loaded]


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
            inner = click.Context(command, info_name=name)
            for sub in command.list_commands(inner):
                each = command.get_command(inner, sub)
                assert each is not None, f"{name} {sub}"
                found.append((f"{name} {sub}", each))
    return found


def test_env_lists_every_subcommand_it_imports_lazily() -> None:
    names = [path for path, _ in _every_command() if path.startswith("env ")]
    for expected in ("create", "exec", "logs", "open", "port", "ssh", "ssh-config"):
        assert f"env {expected}" in names


# What click does to run ``env create`` or ``env exec``, and what their bodies import on the way to the session.
_RUN_PATH = """
import click
from devyard.cli.main import cli
group = cli.get_command(click.Context(cli), "env")
for name in ("create", "exec"):
    assert group.get_command(click.Context(group), name) is not None
import devyard.client, devyard.cli._exec_session, devyard.cli._waiting, devyard.cli._references
"""


def test_env_create_and_exec_import_only_what_they_use() -> None:
    assert _imported_after(_RUN_PATH, NOT_ON_THE_RUN_PATH) == []


@pytest.mark.parametrize("given_by", ["variables", "config file"])
def test_env_create_against_an_unreachable_server_imports_only_what_it_uses(
    cli_env: dict[str, str], given_by: str
) -> None:
    """The whole process, as ``python -X importtime`` sees it: the command's module and the client, nothing of
    NOT_ON_THE_RUN_PATH, whether the server comes from the variables or from the config file."""
    command = [sys.executable, "-X", "importtime", "-m", "devyard", "env", "create", "--image", "x", "--", "true"]
    server = {"server": "http://127.0.0.1:9", "token": "x"}
    variables = {"PYTHONDONTWRITEBYTECODE": ""}
    if given_by == "variables":
        variables.update(DEVYARD_SERVER=server["server"], DEVYARD_TOKEN=server["token"])
    else:
        config = Path(cli_env["XDG_CONFIG_HOME"]) / "devyard" / "config.json"
        config.parent.mkdir(parents=True)
        config.write_text(json.dumps({"current_profile": "default", "profiles": {"default": server}}))
    ran = subprocess.run(command, env={**cli_env, **variables}, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1 and "cannot reach server http://127.0.0.1:9" in ran.stderr, ran.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in ran.stderr.splitlines() if line.startswith("import time:")}
    assert {"devyard.cli.environments", "devyard.client._connections"} <= imported, "the trace is read as it should be"
    # random is imported for the delays between retries, which an unreachable server brings about.
    assert sorted((set(NOT_ON_THE_RUN_PATH) - {"random"}) & imported) == []


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
    assert _imported_after(_RUN_PATH + "import devyard.cli.ports", NOT_ON_THE_RUN_PATH) == [
        "devyard.cli.ports",
        "subprocess",
        "shutil",
    ]
