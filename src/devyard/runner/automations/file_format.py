"""The automations file (Gitpod's format): found in a workspace, read, and validated into frozen dataclasses.

The environment reconciler calls ``find_automations_file`` on the environment's workspace (the project's
``automations_path``, else ``.devyard/automations.yaml``, else Gitpod's ``.gitpod/automations.yaml``) and
``load_automations`` on what it finds; the executor runs the result. The format::

    services:
      ID: {name, description, triggeredBy: [TRIGGER...], commands: {start, ready, stop}}
    tasks:
      ID: {name, description, command, dependsOn: [TASK_ID...], triggeredBy: [TRIGGER...]}

Commands are shell strings, run with ``/bin/sh -c``. A missing or empty file means no automations. Everything
wrong with a file is reported at once, each problem with its file, line and column (from YAML's node marks:
the file is composed into a node tree and validated node by node, never loaded into plain values first).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import yaml

from devyard.runner.errors import PermanentError
from devyard.wire.automations import AutomationTrigger

__all__ = [
    "DEFAULT_PATHS",
    "Automations",
    "AutomationsFileError",
    "Problem",
    "Service",
    "Task",
    "find_automations_file",
    "load_automations",
    "parse_automations",
]

#: Where an automations file is looked for when the project does not say, in order.
DEFAULT_PATHS: Final = (".devyard/automations.yaml", ".gitpod/automations.yaml")

_ID = re.compile(r"[A-Za-z0-9_-]+")
_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_Entry = TypeVar("_Entry", "Service", "Task")
_TRIGGERS: Final = ", ".join(trigger.value for trigger in AutomationTrigger)


@dataclass(frozen=True)
class Service:
    id: str
    name: str
    description: str
    triggered_by: tuple[AutomationTrigger, ...]
    #: Runs for as long as the service does.
    start: str
    #: Polled until it exits 0; None: the service is ready once started.
    ready: str | None = None
    #: Stops the service; None: SIGTERM, then SIGKILL after a grace period.
    stop: str | None = None


@dataclass(frozen=True)
class Task:
    id: str
    name: str
    description: str
    command: str
    #: Tasks that must succeed before this one runs.
    depends_on: tuple[str, ...] = ()
    triggered_by: tuple[AutomationTrigger, ...] = ()


@dataclass(frozen=True)
class Automations:
    """The services and tasks of one file, in the file's order; no cycles and no unknown dependencies."""

    services: tuple[Service, ...] = ()
    tasks: tuple[Task, ...] = ()
    #: The file they come from; None when there is none.
    source: str | None = None

    def service(self, automation_id: str) -> Service | None:
        return next((service for service in self.services if service.id == automation_id), None)

    def task(self, automation_id: str) -> Task | None:
        return next((task for task in self.tasks if task.id == automation_id), None)

    def services_for(self, trigger: AutomationTrigger) -> tuple[Service, ...]:
        return tuple(service for service in self.services if trigger in service.triggered_by)

    def tasks_for(self, trigger: AutomationTrigger) -> tuple[Task, ...]:
        return tuple(task for task in self.tasks if trigger in task.triggered_by)

    def task_order(self, task_ids: Iterable[str]) -> tuple[Task, ...]:
        """The tasks ``task_ids`` with everything they depend on, each after its dependencies (ties in the file's
        order). Raises ``KeyError`` for an id that is not a task."""
        by_id = {task.id: task for task in self.tasks}
        wanted: set[str] = set()
        pending = list(task_ids)
        while pending:
            task = by_id[pending.pop()]
            if task.id not in wanted:
                wanted.add(task.id)
                pending.extend(task.depends_on)
        ordered: list[Task] = []
        placed: set[str] = set()
        # Each step places the first task of the file whose dependencies are placed; the file has no cycles, so
        # there is always one.
        while len(ordered) < len(wanted):
            task = next(
                task
                for task in self.tasks
                if task.id in wanted and task.id not in placed and all(d in placed for d in task.depends_on)
            )
            ordered.append(task)
            placed.add(task.id)
        return tuple(ordered)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an automations file; ``line`` and ``column`` count from 1."""

    path: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


class AutomationsFileError(PermanentError):
    """An automations file that cannot be used, with every problem found in it."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def find_automations_file(workspace: Path, configured: str | None = None) -> Path | None:
    """The automations file of the workspace: ``configured`` (the project's ``automations_path``, relative to the
    workspace) when given, else the first of ``DEFAULT_PATHS`` that exists; None when there is none. A configured
    path that leads outside the workspace is refused with ``PermanentError``."""
    candidates = (configured,) if configured else DEFAULT_PATHS
    root = workspace.resolve()
    for candidate in candidates:
        path = (workspace / candidate).resolve()
        if not path.is_relative_to(root):
            raise PermanentError(f"the automations path {candidate!r} leads outside the workspace")
        if path.is_file():
            return path
    return None


def load_automations(path: Path | None, *, shown_as: str | None = None) -> Automations:
    """The automations in the file at ``path``; none when ``path`` is None or the file is missing or empty.
    Problems name the file as ``shown_as`` (its path in the repository, say), else as ``path``. Raises
    ``AutomationsFileError``."""
    if path is None:
        return Automations()
    name = shown_as or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Automations()
    except (OSError, UnicodeDecodeError) as exc:
        raise AutomationsFileError([Problem(name, 1, 1, f"cannot read the file: {exc}")]) from exc
    return parse_automations(text, path=name)


def parse_automations(text: str, *, path: str) -> Automations:
    """The automations in ``text``, the content of the file named ``path``; raises ``AutomationsFileError``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise AutomationsFileError([Problem(path, line, column, f"not valid YAML: {exc.problem or exc}")]) from exc
    except yaml.YAMLError as exc:
        raise AutomationsFileError([Problem(path, 1, 1, f"not valid YAML: {exc}")]) from exc
    reader = _Reader(path)
    automations = reader.file(root)
    if reader.problems:
        raise AutomationsFileError(reader.problems)
    return automations


class _Reader:
    """Validates a composed node tree, collecting every problem instead of stopping at the first."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[Problem] = []

    def problem(self, node: yaml.Node, message: str) -> None:
        self.problems.append(Problem(self.path, node.start_mark.line + 1, node.start_mark.column + 1, message))

    def file(self, root: yaml.Node | None) -> Automations:
        if root is None or _is_null(root):
            return Automations(source=self.path)
        fields = self.mapping(root, "the file", {"services", "tasks"})
        if fields is None:
            return Automations(source=self.path)
        services = self.entries(fields.get("services"), "services", self.service)
        tasks = self.entries(fields.get("tasks"), "tasks", self.task)
        self.check_dependencies(_keys(fields.get("services")), tasks, _keys(fields.get("tasks")))
        return Automations(
            services=tuple(service for service, _ in services),
            tasks=tuple(task for task, _ in tasks),
            source=self.path,
        )

    def entries(
        self, node: yaml.Node | None, section: str, read: Callable[[str, yaml.Node], _Entry | None]
    ) -> list[tuple[_Entry, yaml.MappingNode]]:
        """Each ``ID: {...}`` of a section, read by ``read``; entries with problems are left out."""
        if node is None or _is_null(node):
            return []
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"'{section}' must be a mapping of ids to {section}, not {_describe(node)}")
            return []
        read_entries: list[tuple[_Entry, yaml.MappingNode]] = []
        seen: set[str] = set()
        for key, value in _pairs(node):
            automation_id = self.string(key, f"an id in '{section}'")
            if automation_id is None:
                continue
            if automation_id in seen:
                self.problem(key, f"'{automation_id}' is defined twice in '{section}'")
                continue
            seen.add(automation_id)
            if not _ID.fullmatch(automation_id):
                self.problem(key, f"the id '{automation_id}' may only have letters, digits, '_' and '-'")
                continue
            entry = read(automation_id, value)
            if entry is not None and isinstance(value, yaml.MappingNode):
                read_entries.append((entry, value))
        return read_entries

    def service(self, automation_id: str, node: yaml.Node) -> Service | None:
        what = f"the service '{automation_id}'"
        allowed = {"name", "description", "triggeredBy", "commands"}
        fields = self.mapping(node, what, allowed)
        if fields is None:
            return None
        before = len(self.problems)
        name = self.optional_string(fields.get("name"), f"the name of {what}")
        description = self.optional_string(fields.get("description"), f"the description of {what}")
        triggers = self.triggers(fields.get("triggeredBy"), what)
        commands_node = fields.get("commands")
        start = ready = stop = None
        if commands_node is None or _is_null(commands_node):
            self.problem(node, f"{what} has no 'commands' (it needs at least 'commands.start')")
        else:
            commands = self.mapping(commands_node, f"the commands of {what}", {"start", "ready", "stop"})
            if commands is not None:
                start = self.optional_string(commands.get("start"), f"the start command of {what}")
                ready = self.optional_string(commands.get("ready"), f"the ready command of {what}")
                stop = self.optional_string(commands.get("stop"), f"the stop command of {what}")
                if "start" not in commands or _is_null(commands["start"]):
                    self.problem(commands_node, f"{what} has no 'commands.start'")
                elif start is not None and not start.strip():
                    self.problem(commands["start"], f"the start command of {what} is empty")
        if len(self.problems) > before or start is None:
            return None
        return Service(
            id=automation_id,
            name=name or automation_id,
            description=description or "",
            triggered_by=triggers,
            start=start,
            ready=ready or None,
            stop=stop or None,
        )

    def task(self, automation_id: str, node: yaml.Node) -> Task | None:
        what = f"the task '{automation_id}'"
        fields = self.mapping(node, what, {"name", "description", "command", "dependsOn", "triggeredBy"})
        if fields is None:
            return None
        before = len(self.problems)
        name = self.optional_string(fields.get("name"), f"the name of {what}")
        description = self.optional_string(fields.get("description"), f"the description of {what}")
        command = self.optional_string(fields.get("command"), f"the command of {what}")
        if "command" not in fields:
            self.problem(node, f"{what} has no 'command'")
        elif command is not None and not command.strip():
            self.problem(fields["command"], f"the command of {what} is empty")
        depends_on = tuple(
            dependency
            for dependency, _ in self.string_list(fields.get("dependsOn"), f"'dependsOn' of {what}", "task ids")
        )
        triggers = self.triggers(fields.get("triggeredBy"), what)
        if len(self.problems) > before or command is None:
            return None
        return Task(
            id=automation_id,
            name=name or automation_id,
            description=description or "",
            command=command,
            depends_on=depends_on,
            triggered_by=triggers,
        )

    def check_dependencies(
        self, service_ids: set[str], tasks: list[tuple[Task, yaml.MappingNode]], declared: set[str]
    ) -> None:
        """Refuses dependencies on services, on unknown tasks, on the task itself, and cycles. ``service_ids`` and
        ``declared`` hold every id in the file, also of entries left out for problems of their own: depending on
        one of those is not a second problem."""
        for task, node in tasks:
            depends_node = _field(node, "dependsOn")
            items = depends_node.value if isinstance(depends_node, yaml.SequenceNode) else []
            for item in items:
                dependency = item.value
                if dependency in service_ids:
                    self.problem(
                        item, f"the task '{task.id}' depends on '{dependency}', which is a service, not a task"
                    )
                elif dependency not in declared:
                    self.problem(item, f"the task '{task.id}' depends on '{dependency}', which is not a task here")
                elif dependency == task.id:
                    self.problem(item, f"the task '{task.id}' depends on itself")
        for cycle in _cycles({task.id: task.depends_on for task, _ in tasks}):
            entry = next(node for task, node in tasks if task.id == cycle[0])
            path = " -> ".join((*cycle, cycle[0]))
            names = ", ".join(repr(name) for name in cycle)
            self.problem(_field(entry, "dependsOn") or entry, f"the tasks {names} depend on each other: {path}")

    # Node readers: each reports what is wrong with its node and returns None for it.

    def mapping(self, node: yaml.Node, what: str, allowed: set[str]) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{what} must be a mapping, not {_describe(node)}")
            return None
        fields: dict[str, yaml.Node] = {}
        for key, value in _pairs(node):
            name = self.string(key, f"a key of {what}")
            if name is None:
                continue
            if name in fields:
                self.problem(key, f"'{name}' is given twice in {what}")
            elif name not in allowed:
                self.problem(key, f"unknown key '{name}' in {what} (expected {', '.join(sorted(allowed))})")
            else:
                fields[name] = value
        return fields

    def string(self, node: yaml.Node, what: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            return str(node.value)
        self.problem(node, f"{what} must be a string, not {_describe(node)}")
        return None

    def optional_string(self, node: yaml.Node | None, what: str) -> str | None:
        if node is None or _is_null(node):
            return None
        return self.string(node, what)

    def string_list(self, node: yaml.Node | None, what: str, items: str) -> list[tuple[str, yaml.Node]]:
        if node is None or _is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, f"{what} must be a list of {items}, not {_describe(node)}")
            return []
        values = [(self.string(item, f"an entry of {what}"), item) for item in node.value]
        return [(value, item) for value, item in values if value is not None]

    def triggers(self, node: yaml.Node | None, what: str) -> tuple[AutomationTrigger, ...]:
        triggers: list[AutomationTrigger] = []
        for value, item in self.string_list(node, f"'triggeredBy' of {what}", "triggers"):
            try:
                trigger = AutomationTrigger(value)
            except ValueError:
                self.problem(item, f"unknown trigger '{value}' in {what} (expected one of {_TRIGGERS})")
                continue
            if trigger not in triggers:
                triggers.append(trigger)
        return tuple(triggers)


def _pairs(node: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
    """The key and value nodes of a mapping, with YAML merge keys (``<<: *defaults``) applied."""
    loader = yaml.SafeLoader("")
    try:
        loader.flatten_mapping(node)
    finally:
        loader.dispose()
    return list(node.value)


def _keys(node: yaml.Node | None) -> set[str]:
    if not isinstance(node, yaml.MappingNode):
        return set()
    return {str(key.value) for key, _ in _pairs(node) if isinstance(key, yaml.ScalarNode)}


def _field(node: yaml.MappingNode, name: str) -> yaml.Node | None:
    return next((value for key, value in _pairs(node) if isinstance(key, yaml.ScalarNode) and key.value == name), None)


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    kind = str(node.tag).rsplit(":", 1)[-1]
    return {"null": "empty", "int": "a number", "float": "a number", "bool": "a boolean"}.get(kind, kind)


def _cycles(graph: Mapping[str, tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The cycles of a dependency graph, each once, each starting at its first task in ``graph``'s order
    (self-dependencies are reported elsewhere)."""
    order = {name: index for index, name in enumerate(graph)}
    found: list[tuple[str, ...]] = []
    seen_members: set[frozenset[str]] = set()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for dependency in graph.get(name, ()):
            if dependency == name or dependency not in graph:
                continue
            if dependency in path:
                cycle = path[path.index(dependency) :]
                members = frozenset(cycle)
                if members not in seen_members:
                    seen_members.add(members)
                    start = min(range(len(cycle)), key=lambda i: order[cycle[i]])
                    found.append(tuple(cycle[start:] + cycle[:start]))
            elif dependency not in done:
                visit(dependency, [*path, dependency])
        done.add(name)

    for name in graph:
        if name not in done:
            visit(name, [name])
    return found
