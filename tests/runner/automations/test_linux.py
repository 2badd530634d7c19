"""The automations executor on the linux runtime: real runc containers (root and the busybox image fixture), the
processes inside the environment's pid namespace, signalled from inside it through ``/proc``."""

from __future__ import annotations

from pathlib import Path

from devyard.runner.automations import AutomationsExecutor, ExecutorSettings, log_path, parse_automations
from devyard.runner.runtime import ContainerSpec
from devyard.wire.automations import AutomationPhase, AutomationTrigger

from ..conftest import eventually
from ..linux.runtime_host import RuntimeHost, busybox_layer_fixture, running_runtime, runtime_host_fixture  # noqa: F401  (fixtures)

ENV = "env_auto"
SETTINGS = ExecutorSettings(ready_timeout=10.0, ready_interval=0.1, stop_grace=2.0)
AUTOMATIONS = """
services:
  web:
    triggeredBy: [postEnvironmentStart]
    commands:
      start: "sleep 300 & echo $! > /tmp/child; sleep 0.3; touch /tmp/up; echo serving; wait"
      ready: test -f /tmp/up
tasks:
  deps: {command: "echo deps >> /tmp/order", triggeredBy: [postEnvironmentStart]}
  build: {command: "echo build >> /tmp/order; exit 1", dependsOn: [deps]}
  test: {command: "echo test >> /tmp/order", dependsOn: [build], triggeredBy: [postEnvironmentStart]}
"""


async def test_services_and_tasks_run_inside_a_real_container(runtime_host: RuntimeHost, tmp_path: Path) -> None:
    async with running_runtime(runtime_host) as runtime:
        await runtime.create(ContainerSpec(environment_id=ENV, image="busybox"))
        await runtime.start(ENV)

        def executor() -> AutomationsExecutor:
            return AutomationsExecutor(
                runtime,
                ENV,
                parse_automations(AUTOMATIONS, path="automations.yaml"),
                log_root=tmp_path / "logs",
                state_dir=tmp_path / "state",
                settings=SETTINGS,
            )

        first = executor()
        await first.on_trigger(AutomationTrigger.POST_ENVIRONMENT_START)
        await eventually(lambda: first.status("web").phase is AutomationPhase.READY, timeout=20, what="web ready")
        await first.wait_idle()
        assert [s.phase for s in first.statuses()] == [
            AutomationPhase.READY,
            AutomationPhase.SUCCEEDED,
            AutomationPhase.FAILED,
            AutomationPhase.SKIPPED,
        ]
        order = await runtime.exec(ENV, ["cat", "/tmp/order"])
        assert order.stdout.split() == [b"deps", b"build"]
        child = (await runtime.exec(ENV, ["cat", "/tmp/child"])).stdout.decode().strip()

        # A restarted runner stops the service it can no longer watch, and starts it again.
        second = executor()
        await second.recover()
        await eventually(lambda: second.status("web").phase is AutomationPhase.READY, timeout=20, what="web again")
        assert (await runtime.exec(ENV, ["test", "-d", f"/proc/{child}"])).exit_code != 0

        await second.stop_all()
        assert second.status("web").phase is AutomationPhase.STOPPED
        child = (await runtime.exec(ENV, ["cat", "/tmp/child"])).stdout.decode().strip()
        assert (await runtime.exec(ENV, ["test", "-d", f"/proc/{child}"])).exit_code != 0
        assert "serving" in log_path(tmp_path / "logs", ENV, "web").read_text().splitlines()
