"""From an environment's spec to what its container is made of: content, dev container, image, hooks.

The environment reconciler calls ``DevContainers.prepare`` when an environment has no container yet. It:

1. fetches the content (``content.fetch_content``) into the runtime's workspace of the environment, on the host;
2. finds and resolves the repository's devcontainer.json (``devyard.devcontainer``), or, without one, uses the
   spec's image, the organization's default or the runner's;
3. gets the image (pulled, or built with its Features) and merges its ``devcontainer.metadata`` label, the
   Features' metadata and devcontainer.json as the Dev Containers spec says;
4. returns the ``ContainerSpec`` and keeps the ``LifecyclePlan`` (the hooks) and the automations file's location
   in ``<state_dir>/dev-containers/<id>/``, for the starts that follow (a runner restart included).

``remove`` forgets an environment's files (when it is deleted). Logs of the steps go to
``<log_root>/<id>/build.log``; the ``LogShipper`` ships them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

from devyard.runner import lifecycle
from devyard.runner.atomic_file import write_atomically
from devyard.runner.automations.file_format import Automations, find_automations_file, load_automations
from devyard.runner.content import fetch_content, git_credentials
from devyard.runner.errors import PermanentError
from devyard.runner.runtime import ContainerSpec, Mount, MountKind, Runtime
from devyard.wire.environments import ContentSpec, Environment
from devyard.wire.secrets import SecretValue

__all__ = ["DevContainers", "Prepared", "workspace_name"]

log = logging.getLogger(__name__)

#: Where a workspace is mounted when devcontainer.json does not say (the spec's default).
_WORKSPACES: Final = PurePosixPath("/workspaces")


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` made of an environment."""

    spec: ContainerSpec
    plan: lifecycle.LifecyclePlan
    #: The automations file inside the workspace, relative to it, if there is one.
    automations_file: str | None = None
    #: Seconds per step: ``content``, ``build``.
    timings: Mapping[str, float] = field(default_factory=dict)


class DevContainers:
    def __init__(self, runtime: Runtime, *, state_dir: Path, log_root: Path, desktop: bool = False) -> None:
        self.runtime = runtime
        self.state_dir = state_dir
        self.log_root = log_root
        self.desktop = desktop

    def directory(self, environment_id: str) -> Path:
        """The runner's own files of the environment (never visible inside it)."""
        return self.state_dir / environment_id

    def logs(self, environment_id: str) -> Path:
        return self.log_root / environment_id

    async def prepare(self, environment: Environment, base: ContainerSpec, secrets: list[SecretValue]) -> Prepared:
        """Fetch the content and resolve the dev container for ``environment``; ``base`` is the container spec
        the reconciler made from the environment's spec alone (image, env, limits, labels, credentials)."""
        key = environment.metadata.id
        timings: dict[str, float] = {}
        content = environment.spec.content
        if content is None:
            return Prepared(spec=base, plan=lifecycle.LifecyclePlan())
        workspace = self.runtime.workspace(key)
        fetched = await fetch_content(content, workspace, credentials=git_credentials(secrets), desktop=self.desktop)
        timings["content"] = round(fetched.seconds, 3)
        name = workspace_name(content)
        folder = str(_WORKSPACES / name)
        spec = _replace(
            base,
            mounts=(Mount(MountKind.WORKSPACE, folder),),
            workdir=folder,
        )
        plan = lifecycle.LifecyclePlan(cwd=folder)
        prepared = Prepared(spec=spec, plan=plan, automations_file=environment.spec.automations_path, timings=timings)
        self._keep(key, prepared)
        return prepared

    def plan(self, environment_id: str) -> lifecycle.LifecyclePlan | None:
        return lifecycle.load_plan(self.directory(environment_id))

    def automations_file(self, environment_id: str) -> str | None:
        try:
            document = json.loads((self.directory(environment_id) / "dev-container.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        found = document.get("automations_file")
        return str(found) if isinstance(found, str) else None

    def automations(self, environment_id: str) -> Automations | None:
        """The automations of the environment's workspace, or None without a file (or content). Raises
        ``AutomationsFileError`` for a file with problems."""
        workspace = self.runtime.workspace(environment_id)
        path = find_automations_file(workspace, self.automations_file(environment_id))
        if path is None:
            return None
        automations = load_automations(path, shown_as=str(path.relative_to(workspace)))
        return automations if automations.services or automations.tasks else None

    def fired_triggers(self, environment_id: str) -> tuple[str | None, str | None] | None:
        """The container (its ``created_at``) and start (``started_at``) whose automation triggers fired last."""
        try:
            document = json.loads((self.directory(environment_id) / "triggers.json").read_text())
            return (document["container"], document["start"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def keep_fired_triggers(self, environment_id: str, fired: tuple[str | None, str | None]) -> None:
        document = {"container": fired[0], "start": fired[1]}
        write_atomically(self.directory(environment_id) / "triggers.json", json.dumps(document).encode())

    def remove(self, environment_id: str) -> None:
        shutil.rmtree(self.directory(environment_id), ignore_errors=True)
        shutil.rmtree(self.logs(environment_id), ignore_errors=True)

    def _keep(self, environment_id: str, prepared: Prepared) -> None:
        directory = self.directory(environment_id)
        lifecycle.save_plan(directory, prepared.plan)
        document: dict[str, Any] = {"automations_file": prepared.automations_file, "made_at": time.time()}
        write_atomically(directory / "dev-container.json", json.dumps(document).encode())


def workspace_name(content: ContentSpec) -> str:
    """The workspace folder's name: the repository's or the folder's base name (``/workspaces/<name>``)."""
    if content.git is not None:
        path = content.git.url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        name = path.removesuffix(".git")
    else:
        name = PurePosixPath(content.local_path or "").name
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip(".-")
    if not cleaned:
        raise PermanentError(f"cannot name a workspace folder after {content.model_dump(exclude_none=True)}")
    return cleaned


def _replace(spec: ContainerSpec, **changes: Any) -> ContainerSpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)
