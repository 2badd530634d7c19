"""``python -m devyard.local``: the local daemon; ``lifecycle.ensure_daemon`` starts it this way."""

from devyard.local.daemon import main

main()
