"""The ``linux`` runtime: each environment an isolated runc container on an overlayfs root, in its own network.

Modules: ``runtime`` (``LinuxRuntime``, the ``Runtime`` the agent drives), ``runc`` (the runc binary, as
asyncio calls), ``oci_config`` (the OCI runtime configuration of a container), ``seccomp`` (its profile),
``cgroups`` (v1 and v2 hosts), ``network`` (network namespaces, veths, the bridge, nftables).

Contracts:
- Nothing is injected into the image: the runner acts on a container from outside (runc, namespaces).
- Every step is idempotent and written so that a runner killed at any point finds, on restart, either the
  old state or the new one, and can finish or undo the step (``LinuxRuntime.list`` adopts what is there).
- Root inside is an unprivileged id outside: every container has a user namespace mapped to the runner's
  ``images.image.IdRange``, the range the image store shifts layer ownership into.
"""

__all__: list[str] = []
