"""``devyard server``: run the management plane in the foreground until SIGTERM or Ctrl-C.

Only the flags a user gave are passed on, so ``DEVYARD_SERVER_*`` variables fill in the rest
(``ServerSettings`` reads them); the settings' validation errors become one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["server", "settings_or_exit"]


@click.command()
@click.option("--listen", metavar="HOST:PORT", help="Where to listen [default: 127.0.0.1:7480].")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the server keeps its SQLite database and secret key [default: /var/lib/devyard/server].",
)
@click.option("--database", metavar="URL", help="A postgresql://... URL; default: SQLite in the state directory.")
@click.option("--public-url", metavar="URL", help="The URL runners and users reach this server at.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Server processes sharing the port, one core each (PostgreSQL only) [default: 1].",
)
def server(
    listen: str | None, state_dir: Path | None, database: str | None, public_url: str | None, workers: int | None
) -> None:
    """Run the management plane: the API, the database and the control loops.

    On its first start it makes the organization `default` and the user `admin`, and writes the admin's
    token to STATE_DIR/admin-token: `devyard login --server URL < STATE_DIR/admin-token`.
    Every setting can also come from a DEVYARD_SERVER_* variable (DEVYARD_SERVER_LISTEN, ...).
    """
    from devyard.server.settings import ServerSettings

    given = {
        "listen": listen,
        "state_dir": state_dir,
        "database": database,
        "public_url": public_url,
        "workers": workers,
    }
    settings = settings_or_exit(ServerSettings, given)
    if listen is not None:
        _check_listen(settings.host_port)

    if settings.workers > 1 and settings.is_sqlite():
        raise click.UsageError("--workers above 1 needs PostgreSQL (--database postgresql://...)")

    from devyard.server.app import serve

    serve(settings)


def settings_or_exit(settings_class: Any, given: dict[str, Any]) -> Any:
    """``settings_class`` built from the flags that were given (and its environment variables)."""
    from pydantic import ValidationError

    from devyard.cli._invocation import describe_validation_error

    try:
        return settings_class(**{key: value for key, value in given.items() if value is not None})
    except ValidationError as exc:
        raise click.ClickException(describe_validation_error(exc)) from None


def _check_listen(host_port: Any) -> None:
    try:
        host_port()
    except ValueError:
        raise click.BadParameter("expected HOST:PORT, such as 0.0.0.0:7480", param_hint="--listen") from None
