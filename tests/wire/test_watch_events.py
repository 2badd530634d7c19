"""``WatchEvent.from_json``: the watch stream's lines as the client reads them, without pydantic."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from devyard.wire import meta
from devyard.wire.watch_events import WatchEvent, WatchEventType


def test_an_event_keeps_its_type_as_the_enum_and_its_object_as_given() -> None:
    event = WatchEvent.from_json({"type": "BOOKMARK", "object": {"metadata": {"resource_version": "7"}}, "extra": 1})
    assert event.type is WatchEventType.BOOKMARK and event.type == "BOOKMARK"
    assert event.object == {"metadata": {"resource_version": "7"}}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ([], "a watch event is a JSON object"),
        ({"object": {}}, "unknown watch event type None"),
        ({"type": "RENAMED", "object": {}}, "unknown watch event type 'RENAMED'"),
        ({"type": ["ADDED"], "object": {}}, "unknown watch event type"),
        ({"type": "ADDED"}, "object must be a JSON object"),
        ({"type": "ADDED", "object": "x"}, "object must be a JSON object"),
    ],
)
def test_what_is_no_event_is_a_value_error_that_says_why(data: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        WatchEvent.from_json(data)


def test_the_wire_metadata_module_still_offers_both_names() -> None:
    assert meta.WatchEvent is WatchEvent and meta.WatchEventType is WatchEventType


def test_reading_events_imports_no_pydantic() -> None:
    # The CLI's --wait reads them; pydantic would cost it a tenth of a second to start.
    code = "import sys, devyard.client; assert 'pydantic' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
