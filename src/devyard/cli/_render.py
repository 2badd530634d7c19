"""Building blocks of the output for people: tables, key-value panels, phases in colour, ages.

Only the commands' renderers call these, so rich is imported inside them, never when ``devyard`` starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

    from devyard.wire.meta import Condition

__all__ = ["age", "conditions", "fields", "phase", "plain", "table"]

_PHASE_STYLES = {
    "running": "green",
    "online": "green",
    "stopped": "dim",
    "deleted": "dim",
    "offline": "red",
    "failed": "bold red",
}


def table(
    columns: Sequence[str],
    rows: Iterable[Sequence[RenderableType]],
    *,
    empty: str = "",
    whole: Sequence[str] = ("ID",),
) -> RenderableType:
    """A borderless table with a header row; ``empty`` is shown instead when there are no rows.

    The ``whole`` columns are never cut or wrapped (ids must survive a copy and paste); others may wrap.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    materialized = [list(row) for row in rows]
    if not materialized and empty:
        return Text(empty, style="dim")
    grid = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False)
    for index, column in enumerate(columns):
        if column in whole:
            width = max([len(column)] + [len(str(row[index])) for row in materialized if isinstance(row[index], str)])
            grid.add_column(column, no_wrap=True, min_width=width)
        else:
            grid.add_column(column)
    for row in materialized:
        grid.add_row(*row)
    return grid


def fields(title: str, pairs: Iterable[tuple[str, RenderableType | None]]) -> RenderableType:
    """A title over a two-column ``key  value`` grid, for one resource; empty values are left out."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    for key, value in pairs:
        if value is not None and value != "":
            grid.add_row(key, value)
    return Group(Text(title, style="bold"), grid)


def phase(value: str) -> Text:
    from rich.text import Text

    style = _PHASE_STYLES.get(value, "yellow")
    return Text(value, style=style)


def plain(text: str) -> Text:
    """Text that rich prints as it is: no markup, no highlighting."""
    from rich.text import Text

    return Text(text)


def conditions(items: Sequence[Condition]) -> RenderableType:
    from rich.text import Text

    return table(
        ["CONDITION", "STATUS", "REASON", "MESSAGE", "SINCE"],
        (
            (
                condition.type,
                Text(condition.status.value, style="green" if condition.status.value == "True" else "yellow"),
                condition.reason,
                condition.message,
                age(condition.last_transition_time),
            )
            for condition in items
        ),
    )


def age(moment: datetime | None, now: datetime | None = None) -> str:
    """How long ago, in the largest unit that fits: ``42s``, ``5m``, ``3h``, ``2d``."""
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = max(0, int(((now or datetime.now(UTC)) - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
