"""The ``devyard`` command: thin commands over the HTTP client, and the processes (server, runner, up).

Contracts:
- ``devyard --help`` stays fast: a module of this package imports only click and the standard library at
  import time; httpx, rich, pydantic, the server and the runner are imported inside the command that needs
  them. ``main`` loads a command's module only when that command runs (``main.LAZY_COMMANDS``).
- Every command that talks to the server takes ``--server``, ``--token``, ``--profile`` and ``-o/--output``
  (``_invocation.api_command``); the flag wins over ``DEVYARD_SERVER`` / ``DEVYARD_TOKEN``, which win over the
  config file (``_config``).
- Every error a user can cause ends as one line on stderr and a non-zero exit: the client's ``ApiError`` and
  ``TransportError`` and pydantic's ``ValidationError`` are translated in ``_invocation``; a traceback means
  a bug.
- ``--output json`` prints the API's JSON as the server sent it; the default output is for people (rich).
"""
