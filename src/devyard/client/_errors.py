"""The client's exceptions."""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "TransportError"]


class ApiError(Exception):
    """The server answered with an error envelope (or something that should have been one)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    @property
    def is_not_found(self) -> bool:
        return self.status == 404

    @property
    def is_conflict(self) -> bool:
        return self.status == 409

    @property
    def is_gone(self) -> bool:
        return self.status == 410


class TransportError(Exception):
    """The server could not be reached (after retries)."""
