"""Fixtures of the SSH gateway's tests shared across this folder: ``world`` (a server, a registered runner, the
linux runtime with busybox containers and the gateway in its own event loop) and what it stands on, defined in
``test_ssh_gateway`` and offered here to the other modules (``test_vscode_remote``)."""

from .test_ssh_gateway import (  # noqa: F401 - fixtures
    busybox_layer_fixture,
    runtime_host_fixture,
    world,
)
