"""What one run of an API command was given: the server, the credential, and how to print the answer.

``api_command`` adds ``--server``, ``--token``, ``--profile`` and ``-o/--output`` to a command, resolves them
against the environment and the config file, hands the command an ``Invocation``, and turns the errors a user
can cause into one line on stderr.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec

import click

if TYPE_CHECKING:
    from pydantic import ValidationError
    from rich.console import Console, RenderableType

    from devyard.client import ApiError, Client

__all__ = ["Invocation", "api_command", "describe_api_error", "describe_validation_error", "output_option"]

P = ParamSpec("P")
_UNLIMITED_WIDTH = 1000

#: Render the API's JSON for people.
Renderer = Callable[[Any], "RenderableType"]


@dataclass
class Invocation:
    server: str | None
    token: str | None
    profile: str
    output: str = "text"
    _client: Client | None = field(default=None, repr=False)
    _console: Console | None = field(default=None, repr=False)
    _err_console: Console | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, server: str | None, token: str | None, profile: str | None, output: str = "text") -> Invocation:
        """Flags and environment variables (click resolved those) first, then the config file's profile."""
        if server is not None and token is not None and profile is None:
            return cls(server=server.rstrip("/"), token=token or None, profile="", output=output)
        # Imported only now: with the server and the token given, the config file (and the module that reads it)
        # is not needed, and scripts and benchmarks that give both start a little faster.
        from devyard.cli import _config

        config = _config.load()
        name = profile or config.current_profile or _config.DEFAULT_PROFILE
        saved = config.profiles.get(name)
        if profile is not None and saved is None:
            raise click.ClickException(f"there is no profile {profile!r} in {_config.config_path()}")
        saved = saved or _config.Profile()
        if server is None:
            server = saved.server
            token = token if token is not None else saved.token
        elif token is None and saved.server is not None and _same_server(server, saved.server):
            # A token saved for one server is never sent to another.
            token = saved.token
        return cls(server=server.rstrip("/") if server else None, token=token or None, profile=name, output=output)

    @property
    def json(self) -> bool:
        return self.output == "json"

    def client(self) -> Client:
        if self._client is None:
            from devyard.client import Client, RetryPolicy

            if self.server is None:
                raise click.ClickException(
                    "no server configured: run `devyard login --server URL` or `devyard up`, "
                    "or pass --server / set DEVYARD_SERVER"
                )
            self._client = Client(self.server, self.token, retry=RetryPolicy(attempts=3, max_delay=2.0))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            console = Console()
            if not console.is_terminal:
                # Piped or captured: lines as long as they are, never wrapped or cut to a guessed width.
                console = Console(width=_UNLIMITED_WIDTH)
            self._console = console
        return self._console

    @property
    def err_console(self) -> Console:
        if self._err_console is None:
            from rich.console import Console

            self._err_console = Console(stderr=True)
        return self._err_console

    def emit(self, data: Any, render: Renderer) -> None:
        """Print the API's answer: as JSON with ``-o json``, else as ``render`` makes it for people."""
        if self.json:
            import json

            click.echo(json.dumps({} if data is None else data, indent=2, sort_keys=False, default=str))
        else:
            self.console.print(render(data))

    def note(self, message: str) -> None:
        """A hint for people, on stderr, left out of JSON output."""
        if not self.json:
            self.err_console.print(message, highlight=False)

    @contextlib.contextmanager
    def progress(self, message: str) -> Iterator[Callable[[str], None]]:
        """A spinner on stderr when it is a terminal; yields a function that updates its text."""
        if self.json or not self.err_console.is_terminal:
            yield lambda _: None
            return
        with self.err_console.status(message) as status:
            yield lambda text: status.update(text)


def output_option(function: Callable[P, None]) -> Callable[P, None]:
    return click.option(
        "-o",
        "--output",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="text for people, json for programs (the API's JSON).",
    )(function)


def api_command(function: Callable[Concatenate[Invocation, P], None]) -> Callable[P, None]:
    """Give a click command the connection options; it receives an ``Invocation`` as its first argument."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        server = kwargs.pop("server")
        token = kwargs.pop("token")
        profile = kwargs.pop("profile")
        output = kwargs.pop("output")
        invocation = Invocation.resolve(server, token, profile, output)  # type: ignore[arg-type]
        try:
            with translated_errors(invocation):
                function(invocation, *args, **kwargs)
        finally:
            invocation.close()

    for option in reversed(_CONNECTION_OPTIONS):
        wrapper = option(wrapper)
    return output_option(wrapper)


_CONNECTION_OPTIONS = [
    click.option("--server", envvar="DEVYARD_SERVER", metavar="URL", help="The server [env DEVYARD_SERVER]."),
    click.option("--token", envvar="DEVYARD_TOKEN", metavar="TOKEN", help="The access token [env DEVYARD_TOKEN]."),
    click.option(
        "--profile",
        envvar="DEVYARD_PROFILE",
        metavar="NAME",
        help="A profile of the config file [env DEVYARD_PROFILE].",
    ),
]


@contextlib.contextmanager
def translated_errors(invocation: Invocation) -> Iterator[None]:
    """The client's and pydantic's errors become one-line ``ClickException``s."""
    from devyard.client import ApiError, TransportError

    try:
        yield
    except ApiError as exc:
        raise click.ClickException(describe_api_error(exc, has_token=invocation.token is not None)) from None
    except TransportError as exc:
        reason = str(exc.__cause__ or exc)
        raise click.ClickException(f"cannot reach server {invocation.server}: {reason}") from None
    except Exception as exc:
        # pydantic is imported only by the commands that validate with it: when it is not loaded, no
        # ValidationError can have been raised, and importing it here would cost every command its import.
        pydantic_core = sys.modules.get("pydantic_core")
        if pydantic_core is None or not isinstance(exc, pydantic_core.ValidationError):
            raise
        raise click.ClickException(describe_validation_error(exc)) from None


def describe_api_error(exc: ApiError, *, has_token: bool = True) -> str:
    if exc.status == 401:
        if not has_token:
            return (
                "the server wants a credential and none is configured: pass --token, set DEVYARD_TOKEN "
                "or run `devyard login`"
            )
        return (
            f"the server refused the credential: {exc.message} ({exc.code}); check --token, DEVYARD_TOKEN "
            "or run `devyard login`"
        )
    text = f"{exc.message} ({exc.code})" if exc.message else f"HTTP {exc.status} ({exc.code})"
    problems = _detail_lines(exc.details)
    if problems:
        text += ": " + "; ".join(problems)
    return text


def describe_validation_error(exc: ValidationError) -> str:
    from devyard.wire.meta import NAME_PATTERN

    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"])
        if (error.get("ctx") or {}).get("pattern") == NAME_PATTERN:
            message = _NAME_RULE
        problems.append(f"{location}: {message}" if location else message)
    return "invalid input: " + "; ".join(problems)


_NAME_RULE = "a name is 1 to 63 lower-case letters, digits, '.', '_' or '-', and starts and ends with a letter or digit"


def _detail_lines(details: Any) -> list[str]:
    if not isinstance(details, list):
        return []
    lines = []
    for detail in details:
        if isinstance(detail, dict) and "msg" in detail:
            location = detail.get("loc")
            where = ".".join(str(part) for part in location) if isinstance(location, list | tuple) else ""
            lines.append(f"{where}: {detail['msg']}" if where else str(detail["msg"]))
        elif isinstance(detail, str):
            lines.append(detail)
    return lines


def _same_server(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")
