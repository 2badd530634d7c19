"""Test fixtures' machinery, shared by every test module: ``postgres`` (a real PostgreSQL server per session),
``live_server`` (the real management plane on a real port, in-process or in its own process) and ``network``
(free ports). The fixtures themselves are declared in ``tests/conftest.py``; these modules are plain code that
tests may also call directly.

Importable as ``support`` because pytest puts ``tests/`` on ``sys.path`` (``tests`` itself is not a package).
"""
