"""The management plane: the API, the database, authentication and authorization, and the control loops.

Layers inside, top to bottom: ``api`` (thin FastAPI routes) -> ``store`` (database functions, one module per
kind; they take the session explicitly and never raise HTTP errors) -> ``database`` (engine, tables,
migrations). ``loops`` holds the server's control loops (scheduler, runner liveness, garbage collection),
``watch`` the change feed that watches read.

Pitfalls:
- Every write goes through ``store.resources.Tx`` so that it bumps the global revision, writes the change feed
  and the audit log in the same transaction. A write that bypasses it is invisible to watchers.
- The management plane never connects to a runner.
"""
