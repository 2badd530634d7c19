"""The dev container definition of a repository: devcontainer.json found, parsed (JSONC), validated against the
official schemas, resolved (variables, lifecycle commands, runArgs) and merged with image and Feature metadata.

A pure library: the runner calls it once the repository's content is on the host, the command line may call it
to check a file. It imports nothing of the server, the runner or the client.
"""
