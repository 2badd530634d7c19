"""``python -m bench.ssh``: devyard's SSH gateway beside Debian's OpenSSH ``sshd``, with the same client in one run.

Both targets get the same ``ssh``/``scp`` (Debian's OpenSSH client), the same options (``-F /dev/null``, the
same key, BatchMode, no ControlMaster, the cipher defaults, a fresh known-hosts file per target) and are measured
turn about, so a busy moment of the machine falls on both:

- throughput: ``scp`` of a large file of random data (default 256 MiB) into each, MiB/s;
- per-command latency: ``ssh TARGET true``, a new connection each time.

Modules: ``__main__`` (options, the order of the run, the report), ``peer_sshd`` (an sshd on 127.0.0.1 with its
own host key, config and authorized_keys), ``devyard_gateway`` (a server, a runner on the linux runtime with its
SSH listener on 127.0.0.1, one running environment of the test suite's busybox image), ``client`` (the client's
command lines and the timed runs). ``bench/ssh/setup`` installs openssh-server without starting its service.
Everything talks to 127.0.0.1 only, and every wait has a deadline.
"""

import sys
from pathlib import Path

# The benchmark reuses the test fixtures' plumbing (``support.network``, ``support.registry``) from tests/.
_TESTS = str(Path(__file__).resolve().parents[2] / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
