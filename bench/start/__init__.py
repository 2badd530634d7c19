"""``python -m bench.start``: how fast an environment starts, beside the peers, on the same image in one run.

Each contender is timed from the command that asks for a container to the answer of a first command run
inside it ("started and answered"), on the same busybox root filesystem (``test_image``):

- ``runc``: ``runc run -d`` of a bundle whose process sleeps, then ``runc exec ... true`` (the floor: no image
  handling, no daemon, a read-only root shared by every run; ``peers``);
- ``docker``: ``docker run -d`` then ``docker exec ... true`` on a Docker Engine this benchmark starts for the
  run, with its own data root, sockets, no bridge and no firewall rules (``docker_engine``, ``peers``);
- ``devcontainer``: ``devcontainer up`` (the Dev Containers reference CLI, which itself runs commands inside
  the container before it answers) on the same engine (``peers``);
- ``devyard``: ``devyard env create --image REF --wait`` then ``devyard env exec ENV -- true`` against a
  server and a runner on the linux runtime, the image cached; and the same through the API without a CLI
  process, to show where the time goes (``devyard_start``).

Besides starts: the cold pull (``cold_pull``: ``skopeo copy`` + ``umoci unpack`` against the image store on a
local registry) and the idle density (``devyard_start``: the runner's memory per idle environment).

Modules: ``__main__`` (options, the order of the run), ``harness`` (the cache, the outcome of each part),
``test_image``, ``commands`` (subprocesses with deadlines), ``docker_engine``, ``peers``, ``cold_pull``,
``devyard_start``, ``report``. Everything talks to 127.0.0.1 or to nothing at all, and every wait has a deadline.
"""

import sys
from pathlib import Path

# The benchmark reuses the test fixtures' plumbing (``support.network``, ``support.registry``) from tests/.
_TESTS = str(Path(__file__).resolve().parents[2] / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
