"""The runner's image store: OCI images pulled from registries (or imported), kept by digest, unpacked once.

``image`` holds the types the rest of the runner sees (``Image``, ``ImageConfig``, ``IdRange`` and the
``ImageSource`` protocol); the store, the registry client and the layer unpacker live beside it.

Contracts:
- Every blob is verified against its digest before anything uses it; a blob or a layer directory exists under
  its final name only when it is complete (written elsewhere, then renamed), so a crash or a full disk never
  leaves a half-written one to poison the next start.
- Each layer is unpacked once, with its whiteouts converted for overlayfs and its ownership shifted into the
  runner's ``IdRange``, and shared read-only by every environment that uses it.
- The store counts who holds each image (``prepare(..., holder=environment_id)`` / ``release(holder)``);
  garbage collection removes only what no holder and no name refers to.
"""

__all__: list[str] = []
