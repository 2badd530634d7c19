"""The dev container definition of a repository: devcontainer.json found, parsed (JSONC), validated against the
official schemas, resolved (variables, lifecycle commands, runArgs) and merged with image and Feature metadata.

A pure library: the runner calls it once the repository's content is on the host, the command line may call it
to check a file. It imports nothing of the server, the runner or the client.

Modules, in the order the runner uses them:

- ``config``: ``find(root, name)`` the file, ``load(path, ...)`` it into a frozen ``DevContainerConfig`` (parse,
  validate, substitute, resolve); ``ConfigNotFound`` when a repository has none.
- ``features`` (Features: references, metadata, install order) works on ``config.features``.
- ``image_metadata``: ``parse_label`` reads an image's ``devcontainer.metadata``; ``merge`` combines it, the
  Features' entries and the config into the ``MergedConfig`` the container is made with.
- ``substitution``: ``substitute_container_env`` once the container's environment is known.
- underneath: ``jsonc`` (parsing with positions), ``schema`` (validation in words), ``errors`` (``ConfigError``).

Contracts and pitfalls:

- Every refusal is a ``ConfigError`` whose ``str`` is ``FILE:LINE:COLUMN: MESSAGE``, written for the repository's
  author: show it as it is.
- Paths in a config (the Dockerfile, the build context) are resolved and refused when they leave the repository,
  symbolic links included; bind mount sources are host paths taken as written: whether a runner allows them is
  the runner's decision.
- ``${localEnv:...}`` reads only what the caller passes: the runner's own environment is not the user's.
- devyard supports one container: Docker Compose configs are refused, and runArgs other than the few it maps.
"""
