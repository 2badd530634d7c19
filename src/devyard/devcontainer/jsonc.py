"""JSON with comments (JSONC), as VS Code and the Dev Containers CLI read devcontainer.json.

``parse`` reads a document: ``//`` and ``/* */`` comments, trailing commas in objects and arrays, and a leading
byte order mark are accepted; duplicate keys are allowed and the last one wins. Every syntax error is a
``ConfigError`` at its 1-based line and column. ``parse_with_positions`` also returns where each value (and each
property name) starts, so that later checks (the schema, runArgs, paths) can point at the line.

Called by ``config`` (devcontainer.json), ``features`` (devcontainer-feature.json) and ``image_metadata``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from typing import Any

from devyard.devcontainer.errors import ConfigError

__all__ = ["JsonPath", "Positions", "parse", "parse_with_positions"]

JsonPath = tuple[str | int, ...]
"""Where a value is in a document: the keys and indexes from the top, ``()`` for the document itself."""

# Deeper than any real config; a limit keeps a hostile file from exhausting Python's stack.
_MAX_DEPTH = 256

_SPACE = re.compile(r"[ \t\n\r\ufeff\u00a0\u2028\u2029]+")
_STRING_RUN = re.compile(r'[^"\\\x00-\x1f]+')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_WORD = re.compile(r"[A-Za-z_$0-9.+-]+")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}


class Positions:
    """The 1-based line and column where each value, and each property name, of a parsed document starts."""

    def __init__(self, line_starts: Sequence[int], values: dict[JsonPath, int], keys: dict[JsonPath, int]) -> None:
        self._line_starts = line_starts
        self._values = values
        self._keys = keys

    def at(self, path: Sequence[str | int]) -> tuple[int, int] | None:
        """Where the value at ``path`` starts; ``None`` when the document has no such value."""
        offset = self._values.get(tuple(path))
        return None if offset is None else self._line_column(offset)

    def key_at(self, path: Sequence[str | int]) -> tuple[int, int] | None:
        """Where the property name of the value at ``path`` starts (for "unknown property" messages); ``None``
        when the path does not end in an object's key."""
        offset = self._keys.get(tuple(path))
        return None if offset is None else self._line_column(offset)

    def nearest(self, path: Sequence[str | int]) -> tuple[int, int]:
        """Where the value at ``path`` starts, or its closest existing parent (the document at worst)."""
        path = tuple(path)
        for end in range(len(path), -1, -1):
            found = self.at(path[:end])
            if found is not None:
                return found
        return (1, 1)

    def _line_column(self, offset: int) -> tuple[int, int]:
        index = bisect.bisect_right(self._line_starts, offset) - 1
        return index + 1, offset - self._line_starts[index] + 1


def parse(text: str, *, source: str) -> Any:
    """The value of the JSONC document ``text``; ``source`` names the file in errors."""
    return _Parser(text, source, record=False).document()


def parse_with_positions(text: str, *, source: str) -> tuple[Any, Positions]:
    """The value of the JSONC document ``text`` and where each of its values starts."""
    parser = _Parser(text, source, record=True)
    value = parser.document()
    return value, Positions(parser.line_starts, parser.values, parser.keys)


def _line_starts(text: str) -> list[int]:
    starts = [0]
    for match in re.finditer(r"\r\n|\r|\n", text):
        starts.append(match.end())
    return starts


def _describe(text: str, offset: int) -> str:
    if offset >= len(text):
        return "the end of the file"
    char = text[offset]
    word = _WORD.match(text, offset)
    if word is not None and len(word.group()) > 1:
        shown = word.group()
        return repr(shown if len(shown) <= 20 else shown[:20] + "...")
    if char == '"':
        return "a string"
    if char.isprintable():
        return repr(char)
    return f"the character U+{ord(char):04X}"


class _Parser:
    def __init__(self, text: str, source: str, *, record: bool) -> None:
        self.text = text
        self.source = source
        self.record = record
        self.offset = 0
        self.line_starts = _line_starts(text)
        self.values: dict[JsonPath, int] = {}
        self.keys: dict[JsonPath, int] = {}

    def fail(self, offset: int, message: str) -> ConfigError:
        index = bisect.bisect_right(self.line_starts, offset) - 1
        return ConfigError(self.source, index + 1, offset - self.line_starts[index] + 1, message)

    def document(self) -> Any:
        self.skip()
        if self.offset >= len(self.text):
            raise self.fail(self.offset, "the file is empty: expected a JSON value such as {}")
        value = self.value((), 0)
        self.skip()
        if self.offset < len(self.text):
            raise self.fail(
                self.offset, f"unexpected {_describe(self.text, self.offset)} after the end of the document"
            )
        return value

    def skip(self) -> None:
        """Moves past white space and comments."""
        text = self.text
        while True:
            match = _SPACE.match(text, self.offset)
            if match is not None:
                self.offset = match.end()
            if text.startswith("//", self.offset):
                end = text.find("\n", self.offset)
                cr = text.find("\r", self.offset)
                if cr != -1 and (end == -1 or cr < end):
                    end = cr
                self.offset = len(text) if end == -1 else end
            elif text.startswith("/*", self.offset):
                end = text.find("*/", self.offset + 2)
                if end == -1:
                    raise self.fail(self.offset, "unterminated comment: '/*' without a closing '*/'")
                self.offset = end + 2
            else:
                return

    def value(self, path: JsonPath, depth: int) -> Any:
        text, start = self.text, self.offset
        if self.record:
            self.values[path] = start
        if start >= len(text):
            raise self.fail(start, "expected a value, found the end of the file")
        char = text[start]
        if char == "{":
            return self.object(path, depth)
        if char == "[":
            return self.array(path, depth)
        if char == '"':
            return self.string()
        number = _NUMBER.match(text, start)
        if number is not None:
            end = number.end()
            word = _WORD.match(text, start)
            if word is not None and word.end() > end:
                raise self.fail(start, f"{word.group()!r} is not a valid number")
            self.offset = end
            literal = number.group()
            if "." in literal or "e" in literal or "E" in literal:
                return float(literal)
            return int(literal)
        word = _WORD.match(text, start)
        if word is not None and word.group() in _LITERALS:
            self.offset = word.end()
            return _LITERALS[word.group()]
        if char == "'":
            raise self.fail(start, "strings must be in double quotes, not single quotes")
        if word is not None:
            raise self.fail(
                start,
                f"unexpected {word.group()!r}: expected a value (a string in double quotes, "
                "a number, true, false, null, an object or an array)",
            )
        raise self.fail(start, f"unexpected {_describe(text, start)}: expected a value")

    def object(self, path: JsonPath, depth: int) -> dict[str, Any]:
        if depth >= _MAX_DEPTH:
            raise self.fail(self.offset, f"objects and arrays nested more than {_MAX_DEPTH} deep")
        opening = self.offset
        self.offset += 1
        result: dict[str, Any] = {}
        text = self.text
        self.skip()
        while True:
            if self.offset >= len(text):
                raise self.fail(opening, "unterminated object: '{' without a closing '}'")
            char = text[self.offset]
            if char == "}":
                self.offset += 1
                return result
            if char != '"':
                if char == "'":
                    raise self.fail(self.offset, "property names must be in double quotes, not single quotes")
                raise self.fail(
                    self.offset,
                    f"expected a property name in double quotes or '}}', found {_describe(text, self.offset)}",
                )
            key_offset = self.offset
            key = self.string()
            self.skip()
            if not text.startswith(":", self.offset):
                raise self.fail(
                    self.offset, f"expected ':' after the property name {key!r}, found {_describe(text, self.offset)}"
                )
            self.offset += 1
            self.skip()
            child = (*path, key)
            if key in result:
                # The last one wins, as in VS Code: forget where the first one's values were.
                del result[key]
                if self.record:
                    self.forget(child)
            if self.record:
                self.keys[child] = key_offset
            result[key] = self.value(child, depth + 1)
            self.skip()
            if self.offset >= len(text):
                raise self.fail(opening, "unterminated object: '{' without a closing '}'")
            char = text[self.offset]
            if char == ",":
                self.offset += 1
                self.skip()
            elif char != "}":
                raise self.fail(
                    self.offset,
                    f"expected ',' or '}}' after the value of {key!r}, found {_describe(text, self.offset)}",
                )

    def array(self, path: JsonPath, depth: int) -> list[Any]:
        if depth >= _MAX_DEPTH:
            raise self.fail(self.offset, f"objects and arrays nested more than {_MAX_DEPTH} deep")
        opening = self.offset
        self.offset += 1
        result: list[Any] = []
        text = self.text
        self.skip()
        while True:
            if self.offset >= len(text):
                raise self.fail(opening, "unterminated array: '[' without a closing ']'")
            if text[self.offset] == "]":
                self.offset += 1
                return result
            if text[self.offset] == ",":
                raise self.fail(self.offset, "unexpected ',': expected a value or ']'")
            result.append(self.value((*path, len(result)), depth + 1))
            self.skip()
            if self.offset >= len(text):
                raise self.fail(opening, "unterminated array: '[' without a closing ']'")
            char = text[self.offset]
            if char == ",":
                self.offset += 1
                self.skip()
            elif char != "]":
                raise self.fail(
                    self.offset, f"expected ',' or ']' after an array element, found {_describe(text, self.offset)}"
                )

    def string(self) -> str:
        text = self.text
        opening = self.offset
        offset = opening + 1
        parts: list[str] = []
        while True:
            run = _STRING_RUN.match(text, offset)
            if run is not None:
                parts.append(run.group())
                offset = run.end()
            if offset >= len(text):
                raise self.fail(opening, "unterminated string: no closing '\"'")
            char = text[offset]
            if char == '"':
                self.offset = offset + 1
                return "".join(parts)
            if char == "\\":
                escape = text[offset + 1 : offset + 2]
                if escape in _ESCAPES and escape:
                    parts.append(_ESCAPES[escape])
                    offset += 2
                elif escape == "u":
                    digits = text[offset + 2 : offset + 6]
                    if len(digits) != 4 or not all(c in "0123456789abcdefABCDEF" for c in digits):
                        raise self.fail(offset, "invalid unicode escape: '\\u' needs four hexadecimal digits")
                    code = int(digits, 16)
                    offset += 6
                    # A surrogate pair written as two escapes is one character.
                    if 0xD800 <= code < 0xDC00 and text.startswith("\\u", offset):
                        low = text[offset + 2 : offset + 6]
                        if len(low) == 4 and all(c in "0123456789abcdefABCDEF" for c in low):
                            low_code = int(low, 16)
                            if 0xDC00 <= low_code < 0xE000:
                                code = 0x10000 + ((code - 0xD800) << 10) + (low_code - 0xDC00)
                                offset += 6
                    parts.append(chr(code))
                elif escape in ("", "\n", "\r"):
                    raise self.fail(opening, "unterminated string: no closing '\"'")
                else:
                    raise self.fail(
                        offset,
                        f"invalid escape '\\{escape}' in a string (valid: \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)",
                    )
            elif char in "\n\r":
                raise self.fail(opening, "unterminated string: no closing '\"' before the end of the line")
            elif char == "\t":
                # VS Code reports a raw tab but reads the string anyway; so do we.
                parts.append(char)
                offset += 1
            else:
                raise self.fail(offset, f"control character U+{ord(char):04X} in a string: write it as an escape")

    def forget(self, path: JsonPath) -> None:
        size = len(path)
        for table in (self.values, self.keys):
            for known in [known for known in table if known[:size] == path]:
                del table[known]
