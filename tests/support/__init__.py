"""Test fixtures' machinery, shared by every test module:

- ``databases``: the database kinds a run covers (``--databases``), and a fresh database of a kind;
- ``postgres``: a real PostgreSQL server for the session;
- ``live_server``: the real management plane on a real port, in this process or in its own;
- ``network``: free ports.

The fixtures themselves are declared in ``tests/conftest.py``; these modules are plain code that conftests and
tests may also call directly. Importable as ``support`` because pytest puts ``tests/`` on ``sys.path``
(``tests`` itself is not a package).
"""
