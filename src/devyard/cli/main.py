"""The root of the ``devyard`` command; the console script ``devyard`` calls ``main``.

Commands live in their own modules and are imported only when they run, so that ``devyard --help`` and
``devyard <cmd> --help`` never pay for httpx, rich or pydantic; their one-line help is written here instead.
"""

from __future__ import annotations

from typing import Any, Final

import click

from devyard import __version__
from devyard.cli._lazy_group import LazyGroup

__all__ = ["LAZY_COMMANDS", "cli", "main"]

#: command name -> (``module:attribute``, one-line help), in the order ``devyard --help`` lists them.
LAZY_COMMANDS: Final[dict[str, tuple[str, str]]] = {
    "up": ("devyard.cli.local:up", "Start the local daemon if needed and an environment for a folder or URL."),
    "down": ("devyard.cli.local:down", "Stop the local daemon."),
    "login": ("devyard.cli.login:login", "Save a server and a token in the config file."),
    "whoami": ("devyard.cli.login:whoami", "Show who the configured credential belongs to."),
    "env": ("devyard.cli.environments:env", "Create, list, start, stop and delete environments."),
    "automations": ("devyard.cli.automations:automations", "List, start and stop an environment's services and tasks."),
    "class": ("devyard.cli.environment_classes:environment_class", "Manage environment classes."),
    "project": ("devyard.cli.projects:project", "Manage projects."),
    "secret": ("devyard.cli.secrets:secret", "Manage secrets."),
    "ssh-key": ("devyard.cli.ssh_keys:ssh_key", "Manage your SSH public keys."),
    "token": ("devyard.cli.tokens:token", "Manage access tokens."),
    "org": ("devyard.cli.organizations:org", "Manage organizations."),
    "user": ("devyard.cli.users:user", "Manage users and their roles."),
    "server": ("devyard.cli.processes:server", "Run the management plane."),
    "runner": ("devyard.cli.runners:runner", "Run a runner on this host, or manage runners."),
    "image": ("devyard.cli.images:image", "Pull, list, import and remove the images of a runner on this host."),
}


class _RootGroup(LazyGroup):
    """The root group: its commands in ``LAZY_COMMANDS``'s order, and their help lines from there, so that
    ``devyard --help`` imports none of them."""

    def __init__(self, *args: Any, short_helps: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.short_helps = short_helps

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.lazy_commands, *sorted(set(self.commands) - set(self.lazy_commands))]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.short_helps[name]) for name in self.lazy_commands]
        for name, command in sorted(self.commands.items()):
            if name not in self.lazy_commands and not command.hidden:
                rows.append((name, command.get_short_help_str(formatter.width)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=_RootGroup,
    lazy_commands={name: target for name, (target, _) in LAZY_COMMANDS.items()},
    short_helps={name: short_help for name, (_, short_help) in LAZY_COMMANDS.items()},
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(__version__, "--version", prog_name="devyard")
def cli() -> None:
    """devyard: self-hosted development environments.

    On one machine, `devyard up [PATH|GIT_URL]` runs everything locally and starts an environment.
    For a team, run `devyard server`, a `devyard runner` on each host, and `devyard login` on each desk.

    The server and token come from --server/--token, else DEVYARD_SERVER/DEVYARD_TOKEN, else the
    config file that `devyard login` and `devyard up` write. Every command takes `-o json`.
    """


def main() -> None:
    cli(prog_name="devyard")
