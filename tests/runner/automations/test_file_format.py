"""The automations file: what it holds, where it is found, and every kind of mistake reported with its file,
line and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from devyard.runner.automations import (
    AutomationsFileError,
    Problem,
    find_automations_file,
    load_automations,
    parse_automations,
)
from devyard.runner.errors import PermanentError
from devyard.wire.automations import AutomationTrigger

EXAMPLE = Path(__file__).parents[3] / "examples" / "hello" / ".devyard" / "automations.yaml"


def problems(text: str) -> list[str]:
    """What is wrong with ``text``, each as ``LINE:COLUMN: message``."""
    with pytest.raises(AutomationsFileError) as caught:
        parse_automations(text, path="automations.yaml")
    assert all(problem.path == "automations.yaml" for problem in caught.value.problems)
    return [f"{problem.line}:{problem.column}: {problem.message}" for problem in caught.value.problems]


def test_the_example_file_reads_into_services_and_tasks() -> None:
    automations = load_automations(EXAMPLE)
    (web,) = automations.services
    assert web.id == "web" and web.name == "Web server"
    assert web.triggered_by == (AutomationTrigger.POST_ENVIRONMENT_START,)
    assert web.start == "python3 hello.py" and web.ready is not None and web.stop is None
    (greet,) = automations.tasks
    assert greet.command == "python3 hello.py --check"
    assert greet.triggered_by == (AutomationTrigger.MANUAL,)
    assert automations.source == str(EXAMPLE)


def test_defaults_nulls_and_merge_keys() -> None:
    automations = parse_automations(
        """
services:
  db:
    commands: {start: sleep 100, stop: "kill 1"}
tasks:
  build:
    description: quiet
    command: make
    dependsOn:
    triggeredBy: [manual, manual]
""",
        path="a.yaml",
    )
    (db,) = automations.services
    assert db.name == "db" and db.description == "" and db.triggered_by == () and db.stop == "kill 1"
    (build,) = automations.tasks
    assert build.description == "quiet" and build.depends_on == () and build.triggered_by == (AutomationTrigger.MANUAL,)

    merged = parse_automations(
        "tasks:\n  base: &base {command: make, description: shared}\n  other:\n    <<: *base\n    name: Other\n",
        path="a.yaml",
    )
    other = merged.task("other")
    assert other is not None and other.description == "shared" and other.name == "Other"


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "services:\ntasks:\n", "services: {}\ntasks: {}\n"])
def test_an_empty_file_means_no_automations(text: str) -> None:
    automations = parse_automations(text, path="a.yaml")
    assert automations.services == () and automations.tasks == ()


def test_a_missing_file_means_no_automations(tmp_path: Path) -> None:
    assert load_automations(tmp_path / "absent.yaml").tasks == ()
    assert load_automations(None).services == ()


def test_invalid_yaml_names_the_line() -> None:
    assert problems("services:\n  web: {commands: {start: x}\n") == [
        "3:1: not valid YAML: expected ',' or '}', but got '<stream end>'"
    ]


def test_unknown_keys_and_wrong_types() -> None:
    text = """\
services:
  web:
    runsOn: {docker: {image: node}}
    name: 3
    commands:
      start: [npm, start]
      restart: always
tasks:
  build:
    command: make
    triggeredBy: manual
    dependsOn: [1]
extra: true
"""
    assert problems(text) == [
        "13:1: unknown key 'extra' in the file (expected services, tasks)",
        "3:5: unknown key 'runsOn' in the service 'web' (expected commands, description, name, triggeredBy)",
        "4:11: the name of the service 'web' must be a string, not a number",
        "7:7: unknown key 'restart' in the commands of the service 'web' (expected ready, start, stop)",
        "6:14: the start command of the service 'web' must be a string, not a list",
        "12:17: an entry of 'dependsOn' of the task 'build' must be a string, not a number",
        "11:18: 'triggeredBy' of the task 'build' must be a list of triggers, not str",
    ]


def test_sections_and_entries_of_the_wrong_shape() -> None:
    assert problems("services: [web]\ntasks:\n  build: make\n") == [
        "1:11: 'services' must be a mapping of ids to services, not a list",
        "3:10: the task 'build' must be a mapping, not str",
    ]
    assert problems("- a\n") == ["1:1: the file must be a mapping, not a list"]


def test_what_each_kind_needs() -> None:
    text = """\
services:
  nostart:
    commands: {ready: "true"}
  nocommands:
    name: No commands
  empty:
    commands: {start: "  "}
tasks:
  nocommand:
    name: Nothing to run
  blank:
    command: ""
"""
    assert problems(text) == [
        "3:15: the service 'nostart' has no 'commands.start'",
        "5:5: the service 'nocommands' has no 'commands' (it needs at least 'commands.start')",
        "7:23: the start command of the service 'empty' is empty",
        "10:5: the task 'nocommand' has no 'command'",
        "12:14: the command of the task 'blank' is empty",
    ]


def test_unknown_triggers_and_bad_ids() -> None:
    text = """\
services:
  "web server":
    commands: {start: x}
tasks:
  build:
    command: make
    triggeredBy: [postEnvironmentStart, prebuild, onSave]
  build:
    command: make again
  "ok_id-2":
    command: x
"""
    assert problems(text) == [
        "2:3: the id 'web server' may only have letters, digits, '_' and '-'",
        "7:41: unknown trigger 'prebuild' in the task 'build' (expected one of postDevcontainerStart, "
        "postEnvironmentStart, manual)",
        "7:51: unknown trigger 'onSave' in the task 'build' (expected one of postDevcontainerStart, "
        "postEnvironmentStart, manual)",
        "8:3: 'build' is defined twice in 'tasks'",
    ]


def test_dependencies_on_services_unknown_tasks_and_itself() -> None:
    text = """\
services:
  db:
    commands: {start: x}
tasks:
  migrate:
    command: x
    dependsOn: [db, seed, migrate]
  broken:
    name: 1
  uses-broken:
    command: x
    dependsOn: [broken]
"""
    # Depending on a task that has problems of its own is not another problem.
    assert problems(text) == [
        "9:11: the name of the task 'broken' must be a string, not a number",
        "9:5: the task 'broken' has no 'command'",
        "7:17: the task 'migrate' depends on 'db', which is a service, not a task",
        "7:21: the task 'migrate' depends on 'seed', which is not a task here",
        "7:27: the task 'migrate' depends on itself",
    ]


def test_cycles_are_refused_naming_their_tasks() -> None:
    text = """\
tasks:
  a: {command: x, dependsOn: [b]}
  b: {command: x, dependsOn: [c]}
  c: {command: x, dependsOn: [a]}
  d: {command: x, dependsOn: [e]}
  e: {command: x, dependsOn: [d, a]}
  f: {command: x, dependsOn: [a]}
"""
    assert problems(text) == [
        "2:30: the tasks 'a', 'b', 'c' depend on each other: a -> b -> c -> a",
        "5:30: the tasks 'd', 'e' depend on each other: d -> e -> d",
    ]


def test_the_error_reads_as_lines_a_person_can_follow() -> None:
    with pytest.raises(AutomationsFileError) as caught:
        parse_automations("tasks:\n  a: {}\n", path=".devyard/automations.yaml")
    assert caught.value.problems == (Problem(".devyard/automations.yaml", 2, 6, "the task 'a' has no 'command'"),)
    assert str(caught.value) == ".devyard/automations.yaml:2:6: the task 'a' has no 'command'"


def test_task_order_puts_dependencies_first_in_the_files_order() -> None:
    automations = parse_automations(
        """\
tasks:
  test: {command: x, dependsOn: [build, lint]}
  lint: {command: x}
  build: {command: x, dependsOn: [deps]}
  deps: {command: x}
  unrelated: {command: x}
""",
        path="a.yaml",
    )
    assert [task.id for task in automations.task_order(["test"])] == ["lint", "deps", "build", "test"]
    assert [task.id for task in automations.task_order(["build", "unrelated"])] == ["deps", "build", "unrelated"]
    with pytest.raises(KeyError):
        automations.task_order(["nope"])


def test_the_file_is_found_where_the_project_says_else_devyard_then_gitpod(tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    assert find_automations_file(workspace) is None
    gitpod = workspace / ".gitpod" / "automations.yaml"
    gitpod.parent.mkdir()
    gitpod.write_text("tasks: {}\n")
    assert find_automations_file(workspace) == gitpod.resolve()
    devyard = workspace / ".devyard" / "automations.yaml"
    devyard.parent.mkdir()
    devyard.write_text("tasks: {}\n")
    assert find_automations_file(workspace) == devyard.resolve()
    custom = workspace / "ci" / "auto.yml"
    custom.parent.mkdir()
    custom.write_text("tasks: {}\n")
    assert find_automations_file(workspace, "ci/auto.yml") == custom.resolve()
    # A configured path that is missing does not fall back: the project asked for that file.
    assert find_automations_file(workspace, "ci/missing.yml") is None
    with pytest.raises(PermanentError, match="outside the workspace"):
        find_automations_file(workspace, "../outside.yaml")


def test_load_names_the_file_as_asked(tmp_path: Path) -> None:
    path = tmp_path / "automations.yaml"
    path.write_text("tasks:\n  a: {command: 1}\n")
    with pytest.raises(AutomationsFileError) as caught:
        load_automations(path, shown_as=".devyard/automations.yaml")
    assert (
        str(caught.value)
        == ".devyard/automations.yaml:2:16: the command of the task 'a' must be a string, not a number"
    )
