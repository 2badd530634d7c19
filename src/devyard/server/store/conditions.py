"""Setting conditions on a status dict, with last_transition_time kept across writes that don't change them."""

from __future__ import annotations

from typing import Any

from devyard.server.store.resources import utcnow

__all__ = ["get_condition", "set_condition"]


def set_condition(
    status: dict[str, Any],
    type_: str,
    value: str,
    reason: str = "",
    message: str = "",
    observed_generation: int = 0,
) -> dict[str, Any]:
    """A copy of ``status`` with the condition set; the transition time moves only when the value does."""
    conditions = [dict(c) for c in status.get("conditions", [])]
    for condition in conditions:
        if condition["type"] == type_:
            if condition["status"] != value:
                condition["last_transition_time"] = utcnow().isoformat()
            condition.update(status=value, reason=reason, message=message, observed_generation=observed_generation)
            break
    else:
        conditions.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": message,
                "last_transition_time": utcnow().isoformat(),
                "observed_generation": observed_generation,
            }
        )
    return {**status, "conditions": conditions}


def get_condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in status.get("conditions", []):
        if condition.get("type") == type_:
            return dict(condition)
    return None
