"""Validation against the official devcontainer.json schemas: each problem at the line and column of the value
(of the name for an unknown property), in words, the closest alternative of a oneOf/anyOf reported."""

from __future__ import annotations

import pytest

from devyard.devcontainer import jsonc, schema
from devyard.devcontainer.errors import ConfigError


def problems(text: str) -> list[str]:
    document, positions = jsonc.parse_with_positions(text, source="devcontainer.json")
    return [str(error) for error in schema.problems(document, positions, source="devcontainer.json")]


def test_a_valid_config_has_no_problem() -> None:
    text = """{
        // comments are fine
        "name": "x", "image": "mcr.microsoft.com/devcontainers/base:debian",
        "forwardPorts": [3000, "db:5432"],
        "mounts": ["source=v,target=/v,type=volume", {"type": "bind", "source": "/a", "target": "/b"}],
        "postCreateCommand": {"a": "echo", "b": ["echo", "x"]},
        "customizations": {"vscode": {"extensions": ["ms-python.python"], "settings": {"a": 1}}},
        "hostRequirements": {"cpus": 2, "memory": "4gb", "gpu": "optional"}
    }"""
    assert problems(text) == []
    document, positions = jsonc.parse_with_positions(text, source="f")
    schema.validate(document, positions, source="f")


def test_port_that_is_neither_number_nor_host_port_at_its_line() -> None:
    text = '{\n  "image": "x",\n  "forwardPorts": [\n    3000,\n    "abc"\n  ]\n}\n'
    assert problems(text) == ['devcontainer.json:5:5: forwardPorts[1]: "abc" is not a port number or "host:port"']
    assert problems('{"image": "x", "forwardPorts": [70000]}') == [
        'devcontainer.json:1:33: forwardPorts[0]: 70000 is not a port number or "host:port"'
    ]


def test_unknown_properties_point_at_the_name_with_a_suggestion() -> None:
    text = '{\n  "image": "x",\n  "postCreateComand": "make"\n}'
    assert problems(text) == [
        'devcontainer.json:3:3: unknown property "postCreateComand" (did you mean "postCreateCommand"?)'
    ]
    assert problems('{"build": {"dockerfile": "D",\n "foo": 1}}') == [
        'devcontainer.json:2:2: unknown property "foo" in build'
    ]


def test_the_closest_alternative_is_reported() -> None:
    # The Dockerfile alternative fits but for one argument: no word about the image or compose alternatives,
    # nor about properties left "unevaluated" because of it.
    assert problems('{"build": {"dockerfile": "D", "args": {"a": 1}}}') == [
        "devcontainer.json:1:45: build.args.a: expected a string, found a number (1)"
    ]
    assert problems('{"image": "x", "mounts": [{"type": "tmpfs", "target": "/x"}]}') == [
        'devcontainer.json:1:36: mounts[0].type: "tmpfs" is not one of "bind" or "volume"'
    ]
    assert problems('{"image": "x", "postCreateCommand": {"a": 3}}') == [
        "devcontainer.json:1:43: postCreateCommand.a: expected a string or an array, found a number (3)"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"postCreateCommand": "x"}', 'a dev container needs "image" or "build"'),
        ('{"image": "x", "build": {"dockerfile": "D"}}', "not several"),
        ('{"image": 3}', "image: expected a string, found a number (3)"),
        ('{"image": "x", "init": "yes"}', 'init: expected true or false, found a string ("yes")'),
        ('{"image": "x", "hostRequirements": {"memory": "4 GB"}}', 'is not an amount such as "4gb"'),
        ('{"image": "x", "customizations": {"vscode": {"extensions": ["bad ext"]}}}', "Expected format"),
        ('{"image": "x", "portsAttributes": {"3000": {"onAutoForward": "nope"}}}', 'portsAttributes["3000"]'),
        ("[]", "expected an object, found an array"),
    ],
)
def test_messages_in_words(text: str, expected: str) -> None:
    found = problems(text)
    assert len(found) == 1
    assert expected in found[0]
    assert "is not valid under" not in found[0] and "'type'" not in found[0]  # no dump of the schema


def test_validate_raises_the_first_and_counts_the_others() -> None:
    text = '{\n "image": "x",\n "init": 1,\n "privileged": 2\n}'
    document, positions = jsonc.parse_with_positions(text, source="f.json")
    with pytest.raises(ConfigError) as caught:
        schema.validate(document, positions, source="f.json")
    assert (caught.value.line, caught.value.column) == (3, 10)
    assert caught.value.message == "init: expected true or false, found a number (1) (and 1 more problem)"


def test_describe_path() -> None:
    assert schema.describe_path(()) == "the document"
    assert schema.describe_path(("build", "args", "X_1")) == "build.args.X_1"
    assert schema.describe_path(("forwardPorts", 0)) == "forwardPorts[0]"
    assert schema.describe_path(("portsAttributes", "3000", "label")) == 'portsAttributes["3000"].label'
