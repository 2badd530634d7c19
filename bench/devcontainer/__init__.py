"""``python -m bench.devcontainer``: a dev container with a Dockerfile and a Feature, started by devyard and by
``devcontainer up`` on Docker Engine, cold (every cache empty) and warm (the build cache kept), in one run.

Both start the same folder (``project``): ``.devcontainer/devcontainer.json`` with ``build.dockerfile`` (FROM a
base image served by a registry on 127.0.0.1: the test suite's Debian root by default), a local Feature with an
option, and a postCreateCommand. Each figure runs until the container is running with the postCreateCommand
done, the point where ``devcontainer up`` answers:

- ``devcontainer_contender``: ``devcontainer up --workspace-folder DIR`` on the Docker Engine ``bench.start``
  starts for a run;
- ``devyard_contender``: an environment of the folder (``content.local_path``, as ``devyard up`` makes it) on a
  server and a desktop runner with the linux runtime, from the create request to ``running`` with every hook
  done.

Modules: ``__main__`` (options, the order of the run), ``project``, the two contenders, ``report``. It reuses
``bench.start`` (the engine, the CLI's location, the images, the runner process) and ``tests/support`` (the
registry, the image layouts). Everything talks to 127.0.0.1, and every wait has a deadline.
"""
