"""JSONC: what VS Code accepts (comments, trailing commas, duplicate keys) and every syntax error at its exact
line and column; positions of values for later messages."""

from __future__ import annotations

import pickle

import pytest

from devyard.devcontainer import jsonc
from devyard.devcontainer.errors import ConfigError


def test_comments_trailing_commas_and_bom_are_accepted() -> None:
    text = '\ufeff// leading\n{\n  /* block\n  comment */ "a": [1, 2,], // tail\n  "b": {"c": "//not a comment",},\n}\n'
    assert jsonc.parse(text, source="f.json") == {"a": [1, 2], "b": {"c": "//not a comment"}}


def test_values_of_every_kind() -> None:
    text = r'{"s": "q\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00", "i": -12, "f": 1.5e3, "t": true, "n": null, "e": {}, "l": []}'
    assert jsonc.parse(text, source="f") == {
        "s": 'q"\\/\b\f\n\r\t\u00e9\U0001f600',
        "i": -12,
        "f": 1500.0,
        "t": True,
        "n": None,
        "e": {},
        "l": [],
    }
    assert isinstance(jsonc.parse("7", source="f"), int)


def test_duplicate_keys_last_wins_with_its_position() -> None:
    value, positions = jsonc.parse_with_positions('{\n"a": {"x": 1},\n"a": 2\n}', source="f")
    assert value == {"a": 2}
    assert positions.at(("a",)) == (3, 6)
    assert positions.at(("a", "x")) is None


def test_positions_of_values_and_keys() -> None:
    text = '{\n  "forwardPorts": [3000,\n\t"abc"],\r\n  "build": {"args": {"X": "1"}}\n}'
    _, positions = jsonc.parse_with_positions(text, source="f")
    assert positions.at(()) == (1, 1)
    assert positions.at(("forwardPorts",)) == (2, 19)
    assert positions.at(("forwardPorts", 0)) == (2, 20)
    assert positions.at(["forwardPorts", 1]) == (3, 2)
    assert positions.at(("build", "args", "X")) == (4, 27)
    assert positions.key_at(("build",)) == (4, 3)
    assert positions.at(("nope",)) is None
    assert positions.nearest(("build", "args", "Y")) == (4, 21)


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ("", 1, 1, "empty"),
        ("  // only a comment\n", 2, 1, "empty"),
        ('{\n  "a": "abc\n}', 2, 8, "unterminated string"),
        ('{"a": "abc', 1, 7, "unterminated string"),
        ("{\n  /* never closed\n", 2, 3, "unterminated comment"),
        ('{\n  "a": 1\n  "b": 2\n}', 3, 3, "expected ',' or '}'"),
        ('{\n  "a" 1\n}', 2, 7, "expected ':'"),
        ('{"a": "\\x"}', 1, 8, "invalid escape '\\x'"),
        ('{"a": "\\u12g4"}', 1, 8, "unicode escape"),
        ('{"a": 1}\n{"b": 2}', 2, 1, "after the end of the document"),
        ('{"a": 1} x', 1, 10, "after the end of the document"),
        ("[1 2]", 1, 4, "expected ',' or ']'"),
        ("[1,,2]", 1, 4, "unexpected ','"),
        ("{a: 1}", 1, 2, "property name in double quotes"),
        ("{'a': 1}", 1, 2, "double quotes"),
        ("{\"a\": 'b'}", 1, 7, "double quotes"),
        ('{"a": tru}', 1, 7, "'tru'"),
        ('{"a": 01}', 1, 7, "not a valid number"),
        ('{"a": 1.}', 1, 7, "not a valid number"),
        ('{"a": }', 1, 7, "expected a value"),
        ('{"a": [1, 2}', 1, 12, "expected ',' or ']'"),
        ('{\n"a": [1,\n', 2, 6, "unterminated array"),
        ('{\n  "a": 1,\n', 1, 1, "unterminated object"),
        ('{"a": "x\x01"}', 1, 9, "control character U+0001"),
        ("[" * 300, 1, 257, "nested more than"),
    ],
)
def test_syntax_errors_at_their_line_and_column(text: str, line: int, column: int, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        jsonc.parse(text, source="repo/.devcontainer/devcontainer.json")
    error = caught.value
    assert (error.line, error.column) == (line, column), error.message
    assert words in error.message
    assert str(error) == f"repo/.devcontainer/devcontainer.json:{line}:{column}: {error.message}"


def test_error_without_position_and_pickling() -> None:
    error = ConfigError("f.json", None, None, "compose is not supported")
    assert str(error) == "f.json: compose is not supported"
    again = pickle.loads(pickle.dumps(ConfigError("f.json", 3, 4, "bad")))
    assert (again.source, again.line, again.column, again.message, str(again)) == (
        "f.json",
        3,
        4,
        "bad",
        "f.json:3:4: bad",
    )
