"""The HTTP API: thin routes, one module per kind. Each opens a transaction, calls the kind's store
functions, and returns the wire form. Errors become the one envelope in ``context``'s handlers."""
