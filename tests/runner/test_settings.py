"""RunnerSettings: environment variables with the DEVYARD_RUNNER_ prefix, and refusal of nonsense."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from devyard.runner.settings import RunnerSettings


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEVYARD_RUNNER_SERVER", "https://devyard.example.com")
    monkeypatch.setenv("DEVYARD_RUNNER_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("DEVYARD_RUNNER_WORKERS", "3")
    monkeypatch.setenv("DEVYARD_RUNNER_FAKE_DELAYS", '{"create": 0.5}')
    settings = RunnerSettings()
    assert settings.server == "https://devyard.example.com"
    assert settings.workers == 3
    assert settings.fake_delays == {"create": 0.5}
    assert settings.credential_path() == tmp_path / "credential.json"
    assert settings.fake_state_path() == tmp_path / "fake-runtime.json"
    assert RunnerSettings(fake_persist=False).fake_state_path() is None


@pytest.mark.parametrize(
    "values",
    [
        {"runtime": "docker"},
        {"workers": 0},
        {"fake_delays": {"teleport": 1.0}},
        {"fake_failure_rate": 1.5},
        {"retry_base": 5, "retry_max": 1},
        {"no_such_setting": 1},
    ],
)
def test_nonsense_is_refused(values: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        RunnerSettings(**values)  # type: ignore[arg-type]
