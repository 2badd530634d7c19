"""The project folder both contenders start: a Dockerfile, a local Feature with an option, a postCreateCommand.

``write_project(folder, base_image)`` writes::

    .devcontainer/devcontainer.json      build.dockerfile, the Feature with its option, postCreateCommand
    .devcontainer/Dockerfile             FROM the base image (served by the registry on 127.0.0.1), two RUN steps
    .devcontainer/features/greeting/     devcontainer-feature.json (one string option) and install.sh
    README.md                            something for the workspace to hold

Neither the build nor the Feature needs the network (``build.options``: ``--network=none``, which both devyard
and ``docker build`` accept): the benchmark's Docker Engine has no bridge, and a RUN step that downloaded
something would measure the mirror, not the tools. The postCreateCommand writes outside the workspace, so that
the folder (bind-mounted by ``devcontainer up``, copied by devyard) stays the same from run to run.

Called by ``bench.devcontainer.__main__``.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["FEATURE_OPTION", "POST_CREATE_MARK", "write_project"]

#: The value given to the Feature's option; its install.sh writes it into the image.
FEATURE_OPTION = "hello from the benchmark"
#: The file the postCreateCommand writes inside the container; the benchmark checks it once after a run.
POST_CREATE_MARK = "/tmp/bench-post-create"

_DOCKERFILE = """\
FROM {base}
RUN mkdir -p /opt/bench && echo built > /opt/bench/built
RUN for n in 1 2 3 4 5 6 7 8; do echo "line $n" >> /opt/bench/lines; done && chmod 0644 /opt/bench/lines
"""

_INSTALL = """\
#!/bin/sh
set -e
mkdir -p /usr/local/share/bench
printf '%s\\n' "$GREETING" > /usr/local/share/bench/greeting
"""


def write_project(folder: Path, base_image: str) -> Path:
    """Write the project into ``folder`` (created); returns ``folder``."""
    devcontainer = folder / ".devcontainer"
    feature = devcontainer / "features" / "greeting"
    feature.mkdir(parents=True)
    (devcontainer / "Dockerfile").write_text(_DOCKERFILE.format(base=base_image))
    (feature / "devcontainer-feature.json").write_text(
        json.dumps(
            {
                "id": "greeting",
                "version": "1.0.0",
                "name": "Greeting",
                "options": {"greeting": {"type": "string", "default": "hello", "description": "What to write"}},
            },
            indent=2,
        )
    )
    (feature / "install.sh").write_text(_INSTALL)
    (feature / "install.sh").chmod(0o755)
    config = {
        "name": "bench-devcontainer",
        "build": {"dockerfile": "Dockerfile", "options": ["--network=none"]},
        "features": {"./features/greeting": {"greeting": FEATURE_OPTION}},
        "postCreateCommand": (
            f"cat /usr/local/share/bench/greeting /opt/bench/built > {POST_CREATE_MARK}.partial"
            f" && mv {POST_CREATE_MARK}.partial {POST_CREATE_MARK}"
        ),
    }
    (devcontainer / "devcontainer.json").write_text(json.dumps(config, indent=2))
    (folder / "README.md").write_text("A project for bench/devcontainer.\n")
    return folder
