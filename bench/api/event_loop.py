"""``run``: run a coroutine on uvloop where installed, as the server does (uvicorn picks it), else asyncio.
Used by the load generator and the fleet, whose own CPU use competes with the server's on a small machine."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
