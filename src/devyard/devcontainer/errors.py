"""The one error of the dev container library: a problem in a file, with where it is.

Raised by every module of ``devyard.devcontainer`` (JSONC parsing, schema validation, resolution, Features);
the runner shows ``str(error)`` to the user as is, so the message says what to change.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """A devcontainer.json (or Feature metadata) the library refuses.

    ``source`` is the file's path or a name for it, ``line`` and ``column`` are 1-based (``None`` when the problem
    has no single place), ``message`` says what is wrong in words a person can act on.
    """

    def __init__(self, source: str, line: int | None, column: int | None, message: str) -> None:
        self.source = source
        self.line = line
        self.column = column
        self.message = message
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.source}: {self.message}"
        if self.column is None:
            return f"{self.source}:{self.line}: {self.message}"
        return f"{self.source}:{self.line}:{self.column}: {self.message}"

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, int | None, int | None, str]]:
        # Exceptions pickle through their args; ours has four named ones.
        return (ConfigError, (self.source, self.line, self.column, self.message))
