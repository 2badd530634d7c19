"""devyard: a self-hostable platform for development environments.

The packages, from the top of the import graph to the bottom:

- ``devyard.cli``: the ``devyard`` command.
- ``devyard.local``: the single-machine daemon behind ``devyard up`` (server and runner in one process).
- ``devyard.server``: the management plane (API, database, auth, control loops).
- ``devyard.runner``: the runner (reconcilers, work queue, runtimes).
- ``devyard.client``: the HTTP client of the management plane's API.
- ``devyard.wire``: the wire types that the server, runners and clients share.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
