"""The HTTP client of the management plane's API, used by the CLI, runners and SDK users.

Contracts:
- Every error response becomes an ``ApiError`` that carries the envelope's code, message and details.
- Requests that failed in a way worth retrying (connection errors, 408, 429, 502, 503, 504) are retried with
  jittered exponential backoff, honouring ``Retry-After``; mutations are retried only when the request never
  reached the server (connect errors) or the server said so (429, 503), so a retried POST never runs twice.
- ``watch`` yields ``WatchEvent``s and raises ``ApiError`` with status 410 when the caller must relist.
"""

from devyard.client._errors import ApiError, TransportError
from devyard.client._http import AsyncClient, Client, RetryPolicy

__all__ = ["ApiError", "AsyncClient", "Client", "RetryPolicy", "TransportError"]
