"""The single-machine daemon behind ``devyard up``: the management plane and an embedded runner in one process.

The daemon is a plain client of its own server: it registers its runner through the API with the local
admin's token (``POST /runners`` then the exchange), exactly as a remote runner would, and makes a default
environment class that the runner offers. Environments then go through the same scheduler and reconcilers
as anywhere else.

The state directory (``$XDG_STATE_HOME/devyard``, default ``~/.local/state/devyard``, or ``--state-dir``)::

    daemon.pid     the daemon's pid; the daemon holds an exclusive flock on it for as long as it lives
    daemon.json    {pid, url, port, runner_id, ...}: rewritten by each daemon once it is ready to serve
    daemon.lock    held by ``up`` and ``down`` while they start or stop a daemon, so two never race
    daemon.log     the daemon's stdout and stderr (appended)
    server/        the server's state directory: devyard.db (SQLite), secret-key, and admin-token (the
                   local admin's token, which ``up`` copies into the CLI's config)
    runner/        the embedded runner's state directory: its credential, the fake runtime's containers

Pitfalls:
- Liveness is the flock, never the pid alone: a pid can be reused, and a daemon that died left its files.
- ``lifecycle`` (start, find, stop) runs in the CLI's process and imports nothing heavy; ``daemon`` runs in
  the daemon's process (``python -m devyard.local``) and imports the server and the runner.
"""
