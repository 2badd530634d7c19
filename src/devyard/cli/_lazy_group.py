"""A click group whose commands are imported only when they are used, for ``main.cli`` and the ``env`` group.

A lazy command is named by where it is defined (``module:attribute``); its module is imported when the command
runs, when its help is shown, when shell completion asks for it, or when the group's help lists it (unless the
group writes that list itself, as ``main`` does). Commands added the usual way (``add_command``) work as always.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import click

__all__ = ["LazyGroup"]


class LazyGroup(click.Group):
    """``lazy_commands``: command name -> ``module:attribute`` of the ``click.Command``."""

    def __init__(self, *args: Any, lazy_commands: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_commands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, _, attribute = target.partition(":")
        # The import statement's machinery, not importlib.import_module, which ``python -X importtime`` does not
        # see: the command's module would be missing from the trace that shows what a command imports.
        __import__(module_name)
        command = getattr(sys.modules[module_name], attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command
