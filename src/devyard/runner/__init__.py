"""The runner: connects out to the management plane and makes the environments assigned to it real.

Modules, from the process down: ``main`` (``run_runner``, what ``devyard runner`` calls), ``settings``,
``agent`` (credential, heartbeat, and the loops below), ``credentials``, ``informer`` (list, then watch, into a
local cache), ``workqueue`` and ``controller`` (keys, workers, and the one executor that classifies errors),
``environments`` (the environment reconciler), ``runtime`` (the interface to what runs containers) and
``fake_runtime``; ``errors``, ``backoff`` and ``clock`` are shared by all of them.

Contracts:
- The runner only connects out. It may import ``devyard.client`` and ``devyard.wire``, nothing else of devyard.
- Reconcilers take a key, read the desired state from the informer's cache and the actual state from the
  runtime, take the next step, report status, and return when to look again. They never ask what woke them,
  and may run any number of times for the same state: every step is idempotent.
- One reconcile per key at a time; errors are ``errors.TemporaryError`` (retried with per-key backoff) or
  ``errors.PermanentError`` (reported as ``failed``); anything else is a bug, logged and retried with backoff.
- While the server is unreachable the runner leaves its environments as they are; it removes nothing that a
  complete list from the server has not confirmed is gone.

Pitfalls:
- Never keep a task, a timer or a sleep per environment: a runner holds thousands, the benchmark fifty runners
  in one process. Delays go through the work queue (``add_after``).
- Status is written only when it changed; a write that reorders or re-stamps fields (conditions, timestamps)
  would look like a change on every reconcile.
- Time goes through a ``clock.Clock`` wherever tests need to move it.
"""

__all__: list[str] = []
