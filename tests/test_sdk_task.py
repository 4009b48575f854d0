"""The Task API outside an agent: Task.init in real script processes, finding, creating,
cloning and enqueueing tasks, and the errors a user sees."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from controller import Task, TaskTypes
from controller.backend import Backend
from controller.connect import backend_from_url
from controller.errors import ConflictError
from controller.models import TaskStatus
from controller.sdk import TaskNotFoundError


@pytest.fixture
def api(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """The embedded store, as CONVEYOR_API for the SDK and for the scripts it runs."""
    monkeypatch.setenv("CONVEYOR_API", sqlite_url)
    return backend_from_url(sqlite_url)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
        env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
             "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"},
    ).stdout.strip()


def run_script(script: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_TASK_ID"}
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd or script.parent, env=env,
        capture_output=True, text=True, timeout=60,
    )


def write(path: Path, code: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(code))
    return path


def task_id_from(proc: subprocess.CompletedProcess[str]) -> str:
    for line in proc.stdout.splitlines():
        if line.startswith("TASK "):
            return line.split()[1]
    raise AssertionError(f"no task id printed:\n{proc.stdout}\n{proc.stderr}")


# ------------------------------------------------------------------- Task.init
def test_task_init_in_a_git_repo_records_repository_commit_diff_and_packages(
    api: Backend, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    script = write(repo / "train.py", """\
        import json
        import requests
        from controller import Task

        task = Task.init("local", "train", task_type="training")
        print("TASK", task.id)
    """)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "remote", "add", "origin", "https://user:token@example.com/org/repo.git")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "first")
    script.write_text(script.read_text() + "# an uncommitted change\n")

    proc = run_script(script, "--epochs", "3", cwd=repo)
    assert proc.returncode == 0, proc.stderr
    task = api.get_task(task_id_from(proc))

    assert task.script.repository == "https://example.com/org/repo.git"  # no credentials
    assert task.script.branch == "main"
    assert task.script.commit == git(repo, "rev-parse", "HEAD")
    assert "+# an uncommitted change" in task.script.diff
    assert task.script.entry_point == "train.py --epochs 3"
    assert task.script.working_dir == "."
    assert task.script.code == ""
    assert task.packages == [f"requests=={importlib.metadata.version('requests')}"]
    assert task.type.value == "training"
    assert [h.status.value for h in task.status_history] == ["created", "in_progress", "completed"]


def test_task_init_outside_git_records_the_script_code(api: Backend, tmp_path: Path) -> None:
    script = write(tmp_path / "plain" / "step.py", """\
        from controller import Task
        print("TASK", Task.init("local", "plain").id)
    """)
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    task = api.get_task(task_id_from(proc))
    assert task.script.repository == ""
    assert task.script.code == script.read_text()
    assert task.script.entry_point == "step.py"
    assert task.packages == []
    assert task.status == TaskStatus.completed


def test_a_script_that_raises_marks_its_task_failed_with_the_exception(api: Backend, tmp_path: Path) -> None:
    script = write(tmp_path / "boom.py", """\
        from controller import Task
        print("TASK", Task.init("local", "boom").id, flush=True)
        raise ValueError("bad input 42")
    """)
    proc = run_script(script)
    assert proc.returncode == 1
    assert "ValueError: bad input 42" in proc.stderr  # the usual traceback is still printed
    task = api.get_task(task_id_from(proc))
    assert task.status == TaskStatus.failed
    assert task.status_message == "ValueError: bad input 42"
    log = [line.line for line in api.get_log(task.id)]
    assert any("Traceback" in line for line in log)


def test_a_script_exiting_with_a_non_zero_code_marks_its_task_failed(api: Backend, tmp_path: Path) -> None:
    script = write(tmp_path / "exits.py", """\
        import sys
        from controller import Task
        print("TASK", Task.init("local", "exits").id, flush=True)
        sys.exit(3)
    """)
    proc = run_script(script)
    assert proc.returncode == 3
    task = api.get_task(task_id_from(proc))
    assert task.status == TaskStatus.failed and task.status_message == "the script exited with code 3"


def test_reports_are_flushed_before_a_local_task_completes(api: Backend, tmp_path: Path) -> None:
    script = write(tmp_path / "report.py", """\
        from controller import Logger, Task
        task = Task.init("local", "report")
        print("TASK", task.id)
        for i in range(3):
            Logger.current_logger().report_scalar("loss", "train", 1.0 / (i + 1), iteration=i)
        task.get_logger().report_text("a line for the log")
    """)
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    task_id = task_id_from(proc)
    assert [(s.iteration, s.value) for s in api.get_scalars(task_id)] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert [(line.stream, line.line) for line in api.get_log(task_id)] == [("logger", "a line for the log")]
    assert api.get_task(task_id).status == TaskStatus.completed


def test_execute_remotely_turns_the_run_into_an_enqueued_template_and_exits(
    api: Backend, tmp_path: Path
) -> None:
    script = write(tmp_path / "template.py", """\
        from controller import Task
        task = Task.init("local", "template")
        print("TASK", task.id, flush=True)
        task.connect({"lr": 0.1, "epochs": 3})
        task.execute_remotely(queue_name="default")
        print("still running")
    """)
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert "still running" not in proc.stdout
    task = api.get_task(task_id_from(proc))
    assert task.status == TaskStatus.queued
    assert task.hyperparams["General"] == {"lr": 0.1, "epochs": 3}
    assert task.script.code == script.read_text()


# ------------------------------------------------------- finding tasks, errors
def test_get_task_of_an_unknown_id_names_the_id(api: Backend) -> None:
    with pytest.raises(TaskNotFoundError, match="no task with id 'feedbeef'"):
        Task.get_task(task_id="feedbeef")
    with pytest.raises(ValueError, match="feedbeef"):  # a ValueError too, as in the reference
        Task.get_task(task_id="feedbeef")


def test_get_task_of_an_unknown_name_names_name_and_project(api: Backend) -> None:
    api.create_task({"name": "real", "project": "p"})
    with pytest.raises(TaskNotFoundError, match="no task named 'ghost' in project 'p'"):
        Task.get_task(project_name="p", task_name="ghost")
    with pytest.raises(TaskNotFoundError, match="no task named 'real' in project 'other'"):
        Task.get_task(project_name="other", task_name="real")


def test_get_task_by_name_returns_the_most_recent_match(api: Backend) -> None:
    api.create_task({"name": "step", "project": "p"})
    newest = api.create_task({"name": "step", "project": "p"})
    assert Task.get_task(project_name="p", task_name="step").id == newest.id


def test_create_clone_and_enqueue_a_task_from_a_local_repository(api: Backend, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write(repo / "steps" / "run.py", "print('hi')\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "first")

    draft = Task.create(
        project_name="p", task_name="run", task_type=TaskTypes.data_processing, repo=str(repo),
        script="steps/run.py", working_directory="steps", packages=["tinypkg==1.0"],
        docker="python:3.11", docker_args="--shm-size 1g", argparse_args=[("lr", 0.5), ("--fast", True)],
    )
    record = draft.data
    assert draft.status == "created"
    assert record.type.value == "data_processing"
    assert (record.script.repository, record.script.branch) == (str(repo), "main")
    assert record.script.commit == git(repo, "rev-parse", "HEAD")
    assert (record.script.working_dir, record.script.entry_point) == ("steps", "run.py --lr=0.5 --fast")
    assert record.packages == ["tinypkg==1.0"]
    assert (record.container.image, record.container.arguments) == ("python:3.11", "--shm-size 1g")
    assert record.hyperparams["Args"] == {"lr": 0.5, "fast": True}

    parent = api.create_task({"name": "pipeline"})
    clone = Task.clone(draft, name="run #2", parent=parent.id)
    assert (clone.name, clone.parent, clone.data.script) == ("run #2", parent.id, record.script)
    clone.set_parameters({"Args/lr": 0.9})
    assert clone.get_parameter("Args/lr") == 0.9
    assert Task.enqueue(clone, queue_name="default").status == "queued"
    assert draft.get_status() == "created"


def test_a_time_limit_on_create_and_with_the_setter(api: Backend, tmp_path: Path) -> None:
    script = write(tmp_path / "outside" / "train.py", "print('x')\n")
    draft = Task.create(task_name="train", script=str(script), time_limit_s=90)
    assert draft.data.execution.time_limit_s == 90
    draft.set_time_limit(1.5)
    assert draft.get_time_limit() == 1.5 and api.get_task(draft.id).execution.time_limit_s == 1.5
    draft.set_time_limit(None)
    assert draft.get_time_limit() is None
    with pytest.raises(ValueError, match="a number of seconds > 0"):
        draft.set_time_limit(0)
    clone = Task.create(base_task_id=draft.id, time_limit_s=60)
    assert clone.data.execution.time_limit_s == 60 and clone.data.script == draft.data.script


def test_create_a_module_task(api: Backend) -> None:
    task = Task.create(project_name="p", module="json.tool", argparse_args=[("sort-keys", True)])
    assert task.name == "json.tool"
    assert task.data.script.entry_point == "-m json.tool --sort-keys"
    assert task.data.script.repository == "" and task.data.script.code == ""
    with pytest.raises(ValueError, match="a script or a module, not both"):
        Task.create(module="json.tool", script="x.py")


def test_parameters_of_a_task_that_is_not_a_draft_cannot_be_changed_from_outside(api: Backend) -> None:
    record = api.create_task({"name": "running"})
    api.set_status(record.id, "in_progress")
    with pytest.raises(ConflictError, match="only a task in status created can be edited"):
        Task.get_task(task_id=record.id).set_parameters({"General/x": 1})


def test_unknown_task_type_is_refused_naming_the_known_ones(api: Backend, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task type 'trainnig': one of training, testing"):
        Task.create(task_name="x", script=str(write(tmp_path / "x.py", "")), task_type="trainnig")


def test_task_types_are_the_reference_list() -> None:
    assert [t.value for t in TaskTypes] == [
        "training", "testing", "inference", "data_processing", "application", "monitor",
        "controller", "optimizer", "service", "qc", "custom",
    ]
    assert TaskTypes.data_processing == "data_processing"


def test_importing_the_sdk_loads_no_heavy_library() -> None:
    code = (
        "import sys; from controller import Task, Logger, StorageManager, TaskTypes, OutputModel; "
        "print(sorted(m for m in ('pandas', 'numpy', 'PIL', 'fsspec', 'requests', 'sqlalchemy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
