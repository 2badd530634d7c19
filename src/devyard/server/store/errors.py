"""The errors database functions raise; the API maps each to one HTTP status and error code."""

from __future__ import annotations

from typing import Any

__all__ = ["Conflict", "Forbidden", "Gone", "Invalid", "NotFound", "StaleWrite", "StoreError", "Unauthenticated"]


class StoreError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class Invalid(StoreError):
    """The request is well-formed but makes no sense (an unknown class, a bad combination)."""

    status = 400
    code = "bad_request"


class Unauthenticated(StoreError):
    status = 401
    code = "unauthenticated"


class Forbidden(StoreError):
    status = 403
    code = "forbidden"


class NotFound(StoreError):
    status = 404
    code = "not_found"


class Conflict(StoreError):
    """A stale resource_version, or a name already taken."""

    status = 409
    code = "conflict"


class StaleWrite(Conflict):
    """A concurrent write got to the row first. Worth retrying when the caller pinned no resource_version."""


class Gone(StoreError):
    """A watch from a revision the change feed no longer holds."""

    status = 410
    code = "gone"
