"""``devyard env logs``: print an environment's logs (the dev container build, lifecycle hooks, automations), and
with ``--follow`` keep printing them until the environment is deleted or Ctrl-C.

The runner ships its log files to the management plane; this reads them from there: pages of
``GET /api/v1/environments/{id}/logs``, then, to follow, the same path with ``follow=true``, whose NDJSON
watch events ``Client.watch`` reads (a broken connection is resumed after the last chunk seen). Streams come
interleaved in the order the server received them; when more than one shows, each line gets its stream as a
prefix. Registered on the ``env`` group by ``cli.environments``; imports neither pydantic nor asyncio nor rich.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import click

from devyard.cli._invocation import Invocation, api_command

if TYPE_CHECKING:
    from devyard.client import Client

__all__ = ["logs", "print_logs"]

_PAGE: Final = 1000
_RECONNECT_DELAY: Final = 0.5


@click.command("logs")
@click.argument("environment")
@click.option(
    "--stream",
    metavar="NAME",
    help="Only this stream: build, lifecycle, automations/ID; a name ending in / takes every stream under it.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the environment is deleted.")
@api_command
def logs(invocation: Invocation, environment: str, stream: str | None, follow: bool) -> None:
    """Print the logs of ENVIRONMENT: its build, lifecycle hooks and automations.

    With -o json: the chunks as the API gives them (with --follow, one JSON object a line).
    """
    print_logs(invocation, environment, stream, follow)


def print_logs(invocation: Invocation, environment: str, stream: str | None, follow: bool) -> None:
    """What ``devyard env logs`` does; ``devyard automations logs`` too, with the automations' streams."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    environment_id = resolve_id(client, "environments", "Environment", environment)
    path = f"/api/v1/environments/{environment_id}/logs"
    backlog, after = _read_all(client, path, stream)
    printer = _Printer(several=stream is None or stream.endswith("/"))
    printer.streams.update(chunk["stream"] for chunk in backlog)
    if invocation.json and not follow:
        invocation.emit({"items": backlog, "next_after": after}, lambda data: data)
        return
    # ^C while the backlog prints is as quiet as during the follow: whoever saw a line may press it at once.
    try:
        for chunk in backlog:
            _show(invocation, printer, chunk)
        if not follow:
            printer.finish()
            return
        gone = _follow(invocation, client, printer, path, stream, after)
    except KeyboardInterrupt:
        printer.finish()
        raise SystemExit(130) from None
    printer.finish()
    if gone:
        _note(invocation, f"environment {environment_id} was deleted")


def _read_all(client: Client, path: str, stream: str | None) -> tuple[list[dict[str, Any]], int]:
    chunks: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get(path, {"after": after, "limit": _PAGE, "stream": stream})
        chunks.extend(page["items"])
        after = int(page["next_after"])
        if not page["more"]:
            return chunks, after


def _follow(
    invocation: Invocation, client: Client, printer: _Printer, path: str, stream: str | None, after: int
) -> bool:
    """Print new chunks until the environment is gone (True); a broken stream is resumed after the last chunk."""
    from devyard.client import ApiError, TransportError

    while True:
        try:
            # ``Client.watch`` reads the NDJSON watch events; ``follow`` and ``after`` are this endpoint's own
            # parameters (the list's ``watch`` and ``resource_version`` it adds are not read here).
            params = {"follow": "true", "after": after, "stream": stream}
            for event in client.watch(path, str(after), params):
                if event.type == "ADDED":
                    _show(invocation, printer, event.object)
                    after = max(after, int(event.object["seq"]))
                elif event.type == "DELETED":
                    return True
        except ApiError as exc:
            if exc.is_not_found:
                return True
            raise
        except TransportError:
            pass  # the server went away or restarted: go on after the last chunk seen
        time.sleep(_RECONNECT_DELAY)


def _show(invocation: Invocation, printer: _Printer, chunk: dict[str, Any]) -> None:
    if invocation.json:
        click.echo(json.dumps(chunk))
        return
    for note in printer.check(chunk):
        _note(invocation, note)
    printer.write(chunk["stream"], chunk["data"])


def _note(invocation: Invocation, message: str) -> None:
    if not invocation.json:
        click.echo(f"devyard: {message}", err=True)


@dataclass
class _Printer:
    """Writes chunks to stdout: as they are while one stream shows, else line by line with the stream in front."""

    several: bool
    streams: set[str] = field(default_factory=set)
    #: Per stream: where its next chunk should start (epoch, offset), to tell of restarts and gaps.
    expected: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Per stream: the unfinished last line, when prefixing.
    pending: dict[str, str] = field(default_factory=dict)
    at_line_start: bool = True

    @property
    def prefixing(self) -> bool:
        return self.several and len(self.streams) > 1

    def check(self, chunk: dict[str, Any]) -> Iterator[str]:
        """Notes on the chunk's place: its stream restarted, or bytes before it are missing."""
        name, epoch, offset = chunk["stream"], int(chunk["epoch"]), int(chunk["offset"])
        expected = self.expected.get(name)
        if expected is not None and epoch > expected[0]:
            yield f"{name} restarted (its file on the runner was truncated or replaced)"
        elif expected is not None and offset > expected[1]:
            yield f"{offset - expected[1]} bytes of {name} are missing (dropped by retention or never shipped)"
        elif expected is None and offset > 0:
            yield f"{name}: its first {offset} bytes are no longer kept"
        self.expected[name] = (epoch, offset + len(chunk["data"].encode()))

    def write(self, stream: str, data: str) -> None:
        was_prefixing = self.prefixing
        self.streams.add(stream)
        if not self.prefixing:
            click.echo(data, nl=False)
            if data:
                self.at_line_start = data.endswith("\n")
            return
        if not was_prefixing and not self.at_line_start:
            click.echo("")  # a second stream showed up in the middle of the first one's line
            self.at_line_start = True
        lines = (self.pending.pop(stream, "") + data).split("\n")
        if lines[-1]:
            self.pending[stream] = lines[-1]
        click.echo("".join(f"{stream} | {line}\n" for line in lines[:-1]), nl=False)

    def finish(self) -> None:
        """Print what is left of unfinished lines."""
        for stream, line in sorted(self.pending.items()):
            click.echo(f"{stream} | {line}")
        self.pending.clear()
        if not self.prefixing and not self.at_line_start:
            click.echo("")
            self.at_line_start = True
