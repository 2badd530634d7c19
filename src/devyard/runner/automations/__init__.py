"""Automations: the services and tasks a repository declares in its automations file, run inside its environment.

Modules: ``file_format`` (find, read and validate ``.devyard/automations.yaml`` or Gitpod's
``.gitpod/automations.yaml`` into frozen dataclasses), ``executor`` (``AutomationsExecutor``: runs them through the
runtime's ``open_exec`` and reports ``wire.automations.AutomationStatus`` changes) and ``logs`` (each automation's
capped log file on the runner, read from an offset or followed).

Contracts:
- A file is refused whole, with every problem and its line and column: the executor only ever sees a file without
  cycles or unknown dependencies.
- The executor never blocks the loop and never lets an exception escape unlogged: whatever goes wrong ends as a
  ``failed`` status with a message.
- Processes are known by their pid and start time inside the container, recorded in the executor's state
  directory while they run; a restarted runner stops what it finds (it can no longer hear it) and starts services
  again (``AutomationsExecutor.recover``).

Pitfalls:
- Each running service or task holds a coroutine (its output is copied as it comes); the executor has no timers
  or tasks of its own otherwise. Waiting for readiness polls the ready command, with the interval in
  ``ExecutorSettings``.
- A service's process tree is signalled from inside the container by walking ``/proc``: a process that detaches
  itself from its parent (a double-forked daemon) escapes ``stop``; give such services a ``stop`` command.
"""

from devyard.runner.automations.executor import AutomationsExecutor, ExecutorSettings, StatusCallback
from devyard.runner.automations.file_format import (
    DEFAULT_PATHS,
    Automations,
    AutomationsFileError,
    Problem,
    Service,
    Task,
    find_automations_file,
    load_automations,
    parse_automations,
)
from devyard.runner.automations.logs import DEFAULT_LOG_LIMIT, LogChunk, follow_log, log_path, read_log

__all__ = [
    "DEFAULT_LOG_LIMIT",
    "DEFAULT_PATHS",
    "Automations",
    "AutomationsExecutor",
    "AutomationsFileError",
    "ExecutorSettings",
    "LogChunk",
    "Problem",
    "Service",
    "StatusCallback",
    "Task",
    "find_automations_file",
    "follow_log",
    "load_automations",
    "log_path",
    "parse_automations",
    "read_log",
]
