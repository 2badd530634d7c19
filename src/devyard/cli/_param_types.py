"""Click parameter types for values people type: durations (``90s``, ``30m``, ``1h``), ``KEY=VALUE``, sizes."""

from __future__ import annotations

import re
from typing import Any, Final

import click

__all__ = ["DURATION", "KEY_VALUE", "SIZE_GIB", "SIZE_MIB", "Duration", "KeyValue", "Size"]

# Patterns, compiled (and cached) by ``re`` on first use: compiling them as the module loads cost every command
# that imports it (``env create`` among them) a millisecond, though most never parse a duration or a size.
_DURATION_PATTERN: Final = r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$"
_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE_PATTERN: Final = r"^(\d+(?:\.\d+)?)\s*(mi?b?|gi?b?|ti?b?)?$"
_MIB_PER_UNIT: Final = {"m": 1, "g": 1024, "t": 1024 * 1024}


class Duration(click.ParamType[float, Any]):
    """Seconds, from ``90``, ``90s``, ``30m``, ``1.5h`` or ``2d``."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        match = re.match(_DURATION_PATTERN, str(value).strip().lower())
        if match is None:
            self.fail(f"{value!r} is not a duration such as 90s, 30m, 1h or 2d", param, ctx)
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


class KeyValue(click.ParamType[tuple[str, str], Any]):
    """``KEY=VALUE`` as a pair."""

    name = "key=value"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, separator, item = str(value).partition("=")
        if not separator or not key:
            self.fail(f"{value!r} is not KEY=VALUE", param, ctx)
        return key, item


class Size(click.ParamType[int, Any]):
    """A size in ``unit`` (MiB or GiB): a bare number is in that unit; ``512MiB``, ``4GiB``, ``1TiB`` convert."""

    name = "size"

    def __init__(self, unit: str) -> None:
        self.unit = unit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.match(_SIZE_PATTERN, str(value).strip(), re.IGNORECASE)
        if match is None:
            self.fail(f"{value!r} is not a size such as 512MiB, 4GiB or a number of {self.unit}", param, ctx)
        suffix = (match.group(2) or self.unit)[0].lower()
        mebibytes = float(match.group(1)) * _MIB_PER_UNIT[suffix]
        result = mebibytes / _MIB_PER_UNIT[self.unit[0].lower()]
        if result < 1 or result != int(result):
            self.fail(f"{value!r} is not a whole number of {self.unit}", param, ctx)
        return int(result)


DURATION: Final = Duration()
KEY_VALUE: Final = KeyValue()
SIZE_MIB: Final = Size("MiB")
SIZE_GIB: Final = Size("GiB")
