"""``python -m devyard``: the same as the ``devyard`` command."""

from devyard.cli.main import main

main()
