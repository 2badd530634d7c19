"""``python -m bench.api``: the management plane's API under load, on SQLite and on PostgreSQL.

For each database it starts, each in its own process: PostgreSQL (a fresh, durable cluster in a temporary
directory) or a fresh SQLite state directory; the management plane (``devyard.server.app.serve``); and a fleet
of M fake runners (``fleet``: real ``devyard.runner`` agents, all in one process). This process is the load
generator (``load``):

1. creates N environments through ``POST /api/v1/environments``, a bounded number in flight, while a watch
   opened before the first create notes when each one first reports ``running``;
2. sends a mix of reads, lists and label patches at a fixed rate, open loop, timing each request from the
   moment it was due so that a slow server cannot slow the generator down and hide its own slowness.

``report`` turns the samples into the table it prints, with the targets of the issue beside the figures.
``cpu`` reads how much CPU each process used, because on a small machine all of them share the cores.

Modules: ``__main__`` (options, the run per database), ``postgres``, ``server``, ``fleet``, ``load``,
``report``, ``cpu``. Nothing here talks to anything but 127.0.0.1, and every wait has a deadline.
"""

import sys
from pathlib import Path

# The benchmark reuses the test fixtures' plumbing (``support.network``, ``support.postgres``) from tests/.
_TESTS = str(Path(__file__).resolve().parents[2] / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
