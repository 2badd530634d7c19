"""The wire types: what the management plane, runners and clients send each other.

Contracts:
- Every resource is ``{metadata, spec, status}``. Write schemas (``*Create``, ``*Patch``, ``*StatusWrite``)
  forbid unknown fields; read schemas ignore them, so an older client reads a newer server.
- In a ``*Patch``, a field that is not given is left alone and ``null`` clears it: use ``model_fields_set``.
- Nothing here imports from the rest of devyard.
"""
