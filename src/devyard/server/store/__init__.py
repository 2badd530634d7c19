"""Database functions, one module per kind over ``resources`` (the generic part they share).

They take the session (a ``resources.Tx`` for writes) explicitly, raise the errors of ``errors`` (never HTTP
errors), and leave authorization to the caller: ``devyard.server.policy`` decides who may, these decide what
happens.
"""
