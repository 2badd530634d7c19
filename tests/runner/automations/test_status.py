"""The wire status of an automation: what the runner sends and the CLI reads back."""

from __future__ import annotations

import pydantic
import pytest

from devyard.wire.automations import AutomationKind, AutomationPhase, AutomationStatus, AutomationTrigger


def test_a_status_round_trips_through_json() -> None:
    status = AutomationStatus(
        id="web",
        kind=AutomationKind.SERVICE,
        phase=AutomationPhase.READY,
        triggered_by=AutomationTrigger.POST_ENVIRONMENT_START,
    )
    document = status.model_dump(mode="json")
    assert document["phase"] == "ready" and document["triggered_by"] == "postEnvironmentStart"
    # Read schemas ignore what they do not know, so an older CLI reads a newer runner's status.
    assert AutomationStatus.model_validate({**document, "restarts": 3}) == status


@pytest.mark.parametrize(
    ("kind", "phase"),
    [(AutomationKind.SERVICE, AutomationPhase.SUCCEEDED), (AutomationKind.TASK, AutomationPhase.READY)],
)
def test_a_phase_must_belong_to_its_kind(kind: AutomationKind, phase: AutomationPhase) -> None:
    with pytest.raises(pydantic.ValidationError, match=f"a {kind.value} cannot be {phase.value}"):
        AutomationStatus(id="x", kind=kind, phase=phase)
