"""The `controller` command line, run as a real process against a temporary store.

Tasks, logs and workers are put in place through SqlBackend directly; the commands are
then run with `python -m controller.cli` (what the console script calls), with
CONVEYOR_HOME pointing at the temporary folder and CONVEYOR_API unset, so they open the
same embedded SQLite file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.cli_format import format_age, format_duration, format_table, truncate
from controller.models import TaskStatus

CLI_TIMEOUT_S = 60


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CONVEYOR_API", "CONVEYOR_API_TOKEN", "CONVEYOR_DB")
    }
    env["CONVEYOR_HOME"] = str(home)
    env.update(extra)
    return env


def run_cli(home: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run `controller ARGS` in a subprocess with CONVEYOR_HOME=home."""
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        capture_output=True,
        text=True,
        env=_env(home, **extra_env),
        timeout=CLI_TIMEOUT_S,
    )


def ok(home: Path, *args: str, **extra_env: str) -> str:
    """Run a command that must succeed; return its stdout."""
    proc = run_cli(home, *args, **extra_env)
    assert proc.returncode == 0, f"controller {' '.join(args)} failed:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def fails(home: Path, *args: str, **extra_env: str) -> str:
    """Run a command that must fail with one `error:` line; return that line."""
    proc = run_cli(home, *args, **extra_env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    return lines[0]


def row_of(output: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell` (split on 2+ blanks)."""
    for line in output.splitlines():
        cells = [c for c in line.split("  ") if c.strip()]
        if cells and cells[0].strip() == first_cell:
            return [c.strip() for c in cells]
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[object]:
    """The embedded store the CLI opens with CONVEYOR_HOME=tmp_path."""
    from controller.store import SqlBackend

    backend = SqlBackend(f"sqlite:///{tmp_path}/conveyor.db")
    yield backend
    backend.close()


# ------------------------------------------------------------------ queues


def test_queues_lists_the_default_queues(tmp_path: Path, store) -> None:
    out = ok(tmp_path, "queues")
    assert row_of(out, "NAME")[:2] == ["NAME", "LENGTH"]
    assert row_of(out, "default")[1] == "0"
    assert row_of(out, "services")[1] == "0"
    names = [q["name"] for q in json.loads(ok(tmp_path, "queues", "--json"))]
    assert {"default", "services"} <= set(names)


def test_queue_create_and_delete(tmp_path: Path, store) -> None:
    assert "gpu" in ok(tmp_path, "queues", "create", "gpu")
    assert row_of(ok(tmp_path, "queues"), "gpu")[1] == "0"
    assert "gpu" in fails(tmp_path, "queues", "create", "gpu")  # exists already

    ok(tmp_path, "queues", "delete", "gpu")
    assert "gpu" not in [q.name for q in store.list_queues()]
    fails(tmp_path, "queues", "delete", "gpu")


def test_delete_of_busy_queue_needs_force(tmp_path: Path, store) -> None:
    store.create_queue("busy")
    task = store.create_task({"name": "waits"})
    store.enqueue(task.id, "busy")
    assert "--force" in fails(tmp_path, "queues", "delete", "busy")
    ok(tmp_path, "queues", "delete", "busy", "--force")
    assert store.get_task(task.id).status == TaskStatus.created


# ------------------------------------------------------------------- tasks


def test_tasks_list_and_json(tmp_path: Path, store) -> None:
    task = store.create_task({"name": "train-resnet", "project": "vision", "tags": ["gpu"]})
    other = store.create_task({"name": "other", "project": "nlp"})

    out = ok(tmp_path, "tasks", "list")
    row = row_of(out, task.id)
    assert row[1:4] == ["train-resnet", "vision", "created"]
    assert other.id in out

    data = json.loads(ok(tmp_path, "tasks", "list", "--json", "--project", "vision"))
    assert [t["id"] for t in data] == [task.id]
    assert data[0]["tags"] == ["gpu"]

    assert ok(tmp_path, "tasks", "list", "--tag", "gpu").count("train-resnet") == 1
    assert "other" not in ok(tmp_path, "tasks", "list", "--tag", "gpu")
    assert "No tasks." in ok(tmp_path, "tasks", "list", "--status", "queued")


def test_tasks_show(tmp_path: Path, store) -> None:
    task = store.create_task(
        {
            "name": "train",
            "project": "vision",
            "script": {"repository": "https://example.com/repo.git", "entry_point": "train.py"},
            "packages": ["torch==2.3.0"],
            "container": {"image": "python:3.11"},
            "hyperparams": {"Args": {"lr": 0.01, "epochs": 3}},
            "configuration": {"model": {"depth": 50}},
            "execution": {"queue": "default", "priority": 5},
        }
    )
    out = ok(tmp_path, "tasks", "show", task.id)
    assert task.id in out and "train" in out
    for section in (
        "Script",
        "Packages",
        "Container",
        "Hyperparameters",
        "Configuration",
        "Execution",
        "Runtime",
        "Artifacts",
        "Models",
        "Timestamps",
        "Status history",
    ):
        assert f"\n{section}\n" in out, section
    assert "status:" in out and "created" in out
    assert "https://example.com/repo.git" in out
    assert "torch==2.3.0" in out
    assert "python:3.11" in out
    assert "Args/lr = 0.01" in out
    assert '"depth": 50' in out

    data = json.loads(ok(tmp_path, "tasks", "show", task.id, "--json"))
    assert data["id"] == task.id
    assert data["hyperparams"]["Args"]["epochs"] == 3


def test_enqueue_then_queue_length(tmp_path: Path, store) -> None:
    task = store.create_task({"name": "job"})
    out = ok(tmp_path, "tasks", "enqueue", task.id, "--priority", "3")
    assert task.id in out and "default" in out
    assert store.get_task(task.id).status == TaskStatus.queued
    row = row_of(ok(tmp_path, "queues"), "default")
    assert row[1] == "1"
    assert row[2].endswith("ago")
    lengths = {q["name"]: q["length"] for q in json.loads(ok(tmp_path, "queues", "--json"))}
    assert lengths["default"] == 1
    assert task.id in ok(tmp_path, "queues", "show", "default")


def test_abort_queued_task(tmp_path: Path, store) -> None:
    task = store.create_task({"name": "job"})
    store.enqueue(task.id)
    assert "stopped" in ok(tmp_path, "tasks", "abort", task.id)
    assert store.get_task(task.id).status == TaskStatus.stopped
    assert store.queue_length("default") == 0


def test_reset_task(tmp_path: Path, store) -> None:
    task = store.create_task({"name": "job"})
    store.append_log(task.id, ["old output"])
    store.abort_task(task.id)
    assert "created" in ok(tmp_path, "tasks", "reset", task.id)
    assert store.get_task(task.id).status == TaskStatus.created
    assert store.get_log(task.id) == []


def test_tasks_logs_and_tail(tmp_path: Path, store) -> None:
    task = store.create_task({"name": "job"})
    store.append_log(task.id, [f"line {i}" for i in range(5)])
    assert ok(tmp_path, "tasks", "logs", task.id).splitlines() == [f"line {i}" for i in range(5)]
    assert ok(tmp_path, "tasks", "logs", task.id, "--tail", "2").splitlines() == [
        "line 3",
        "line 4",
    ]
    as_json = [
        json.loads(line) for line in ok(tmp_path, "tasks", "logs", task.id, "--json").splitlines()
    ]
    assert [entry["n"] for entry in as_json] == [0, 1, 2, 3, 4]


def test_tasks_logs_follow_until_terminal(tmp_path: Path, store) -> None:
    task = store.create_task({"name": "job"})
    store.append_log(task.id, ["before"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "tasks", "logs", task.id, "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
    )
    try:
        store.set_status(task.id, "in_progress")
        time.sleep(1.0)
        store.append_log(task.id, ["during 1", "during 2"])
        time.sleep(1.0)
        assert proc.poll() is None  # still following a running task
        store.append_log(task.id, ["last"])
        store.set_status(task.id, "completed")
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["before", "during 1", "during 2", "last"]


def _follow(home: Path, task_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "tasks", "logs", task_id, "--follow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(home),
    )


@pytest.mark.parametrize(
    "ending, code", [("failed", 3), ("stopped", 4), ("completed", 0)]
)
def test_tasks_logs_follow_exit_code_says_how_the_task_ended(
    tmp_path: Path, store, ending: str, code: int
) -> None:
    task = store.create_task({"name": "job"})
    store.set_status(task.id, "in_progress")
    proc = _follow(tmp_path, task.id)
    try:
        store.append_log(task.id, ["working"])
        time.sleep(1.0)
        assert proc.poll() is None
        store.set_status(task.id, ending)
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert out.splitlines() == ["working"]
    assert err == ""


# ------------------------------------------------------ tasks create/clone/delete


def test_tasks_create_from_a_local_script_and_enqueue_it(tmp_path: Path, store) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    script = outside / "train.py"
    script.write_text("print('train')\n")
    (outside / "requirements.txt").write_text("numpy==1.26.4\n# a comment\nrequests\n")
    out = ok(tmp_path, "tasks", "create", "--script", str(script), "--name", "train-1",
             "--project", "vision", "--arg", "epochs=3", "--arg", "fast",
             "--requirements", str(outside / "requirements.txt"), "--time-limit", "10m",
             "--queue", "default", "--priority", "5", "--tag", "nightly")
    task_id = out.split()[2]
    assert out.strip() == f"Created task {task_id} (train-1), queued on default."
    task = store.get_task(task_id)
    assert (task.name, task.project, task.tags, task.status) == (
        "train-1", "vision", ["nightly"], TaskStatus.queued)
    assert task.script.code == "print('train')\n"
    assert task.script.entry_point == "train.py --epochs=3 --fast"
    assert task.hyperparams["Args"] == {"epochs": "3", "fast": True}
    assert task.packages == ["numpy==1.26.4", "requests"]
    assert (task.execution.time_limit_s, task.execution.priority) == (600, 5)
    shown = ok(tmp_path, "tasks", "show", task_id)
    assert "time limit: 10m 00s" in shown


def test_tasks_create_from_a_repository_with_a_container_as_json(tmp_path: Path, store) -> None:
    setup = tmp_path / "setup.sh"
    setup.write_text("apt-get install -y git\n")
    data = json.loads(ok(
        tmp_path, "tasks", "create", "--repo", "https://example.com/team/proj.git",
        "--branch", "main", "--script", "src/train.py", "--working-dir", "src",
        "--package", "torch==2.3.0", "--package", "pandas", "--docker", "python:3.11",
        "--docker-args", "--shm-size 1g", "--docker-setup-script", str(setup),
        "--time-limit", "90", "--type", "data_processing", "--json",
    ))
    assert data["status"] == "created" and data["name"] == "train"
    assert data["type"] == "data_processing"
    assert data["script"]["repository"] == "https://example.com/team/proj.git"
    assert (data["script"]["branch"], data["script"]["working_dir"], data["script"]["entry_point"]) == (
        "main", "src", "train.py")
    assert data["packages"] == ["torch==2.3.0", "pandas"]
    assert data["container"] == {"image": "python:3.11", "arguments": "--shm-size 1g",
                                 "setup_shell_script": "apt-get install -y git\n"}
    assert data["execution"]["time_limit_s"] == 90


def test_tasks_create_from_a_git_work_tree_pins_it_unless_single_file(tmp_path: Path, store) -> None:
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "job.py").write_text("print('job')\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@e"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "job"], cwd=repo, check=True)
    pinned = store.get_task(ok(tmp_path, "tasks", "create", "--script", str(repo / "src" / "job.py"),
                               "--id-only").strip())
    assert (pinned.script.repository, pinned.script.branch) == (str(repo), "main")
    assert (pinned.script.entry_point, pinned.script.code) == ("src/job.py", "")
    single = store.get_task(ok(tmp_path, "tasks", "create", "--script", str(repo / "src" / "job.py"),
                               "--single-file", "--id-only").strip())
    assert (single.script.repository, single.script.code) == ("", "print('job')\n")
    copy = ok(tmp_path, "tasks", "clone", single.id, "--id-only").strip()
    assert store.get_task(copy).script.code == "print('job')\n"


def test_tasks_create_a_module_task(tmp_path: Path, store) -> None:
    out = ok(tmp_path, "tasks", "create", "--module", "json.tool", "--arg", "sort-keys")
    task = store.get_task(out.split()[2])
    assert (task.name, task.script.entry_point) == ("json.tool", "-m json.tool --sort-keys")


@pytest.mark.parametrize(
    "args, problem",
    [
        ((), "give --script PATH or --module MODULE"),
        (("--script", "a.py", "--module", "m"), "not both"),
        (("--module", "m", "--time-limit", "2x"), "'2x' is not a time limit"),
        (("--module", "m", "--time-limit", "0"), "'0' is not a time limit"),
        (("--module", "m", "--priority", "3"), "--priority needs --queue"),
        (("--module", "m", "--queue", "no queue"), "is not a queue name"),
        (("--module", "m", "--single-file"), "--single-file applies to a local --script"),
    ],
)
def test_tasks_create_usage_mistakes(tmp_path: Path, store, args: tuple[str, ...], problem: str) -> None:
    proc = run_cli(tmp_path, "tasks", "create", *args)
    assert proc.returncode == 2, proc.stderr
    assert problem in proc.stderr and "Traceback" not in proc.stderr
    assert store.query_tasks() == []


def test_tasks_create_of_a_missing_script_is_one_line(tmp_path: Path, store) -> None:
    line = fails(tmp_path, "tasks", "create", "--script", str(tmp_path / "nope.py"))
    assert line == f"error: no such script: {tmp_path / 'nope.py'}"


def test_tasks_clone_with_overrides_and_delete(tmp_path: Path, store) -> None:
    task = store.create_task({"name": "train", "project": "p", "execution": {"time_limit_s": 60}})
    out = ok(tmp_path, "tasks", "clone", task.id)
    plain = store.get_task(out.split()[4])
    assert out.startswith(f"Cloned {task.id} as task {plain.id} (train)")
    assert (plain.name, plain.execution.time_limit_s, plain.status) == ("train", 60, TaskStatus.created)

    data = json.loads(ok(tmp_path, "tasks", "clone", task.id, "--name", "train-2", "--project", "q",
                         "--time-limit", "2h", "--queue", "default", "--json"))
    assert (data["name"], data["project"], data["status"]) == ("train-2", "q", "queued")
    assert data["execution"]["time_limit_s"] == 7200 and data["execution"]["queue"] == "default"

    assert ok(tmp_path, "tasks", "delete", plain.id).strip() == f"Deleted task {plain.id}."
    assert fails(tmp_path, "tasks", "show", plain.id).startswith(f"error: no task with id {plain.id!r}")


def test_tasks_delete_of_a_pipeline_deletes_its_steps(tmp_path: Path, store) -> None:
    pipeline = store.create_task({"name": "pipe", "type": "controller"})
    steps = [store.create_task({"name": f"s{i}", "parent": pipeline.id}) for i in range(2)]
    busy = store.create_task({"name": "busy", "parent": pipeline.id})
    store.set_status(busy.id, "in_progress")
    line = fails(tmp_path, "tasks", "delete", pipeline.id)
    assert busy.id in line and "use --force" in line
    assert len(store.query_tasks()) == 4  # all or nothing
    store.set_status(busy.id, "completed")
    out = ok(tmp_path, "tasks", "delete", pipeline.id).strip()
    assert out == f"Deleted task {pipeline.id} and its 3 step(s)."
    assert store.query_tasks() == [] and len(steps) == 2


def test_tasks_delete_of_a_running_task_needs_force(tmp_path: Path, store) -> None:
    task = store.create_task({"name": "busy"})
    store.set_status(task.id, "in_progress")
    line = fails(tmp_path, "tasks", "delete", task.id)
    assert "in_progress" in line and "use --force" in line
    assert store.get_task(task.id).status == TaskStatus.in_progress
    assert "Deleted task" in ok(tmp_path, "tasks", "delete", task.id, "--force")
    assert store.query_tasks() == []


# ------------------------------------------------------------- pipelines


def test_tasks_show_of_a_pipeline_prints_its_dag_as_a_table(tmp_path: Path, store) -> None:
    step = store.create_task({"name": "train"})
    now = time.time()
    nodes = {
        "prepare": {"name": "prepare", "status": "completed", "task_id": "t-prepare", "parents": [],
                    "started": now - 75, "ended": now - 63, "parameters": {"x": "y" * 500}},
        "train": {"name": "train", "status": "running", "task_id": step.id,
                  "parents": ["prepare"], "started": now - 30, "ended": None},
        "report": {"name": "report", "status": "pending", "task_id": None,
                   "parents": ["prepare", "train"], "started": None, "ended": None},
    }
    pipeline = store.create_task({
        "name": "nightly", "type": "controller",
        "configuration": {"Pipeline": {"steps": {n: {} for n in nodes}}, "other": {"a": 1}},
    })
    store.edit_task(pipeline.id, {"runtime": {"pipeline": {
        "name": "nightly", "version": "1.0.2", "status": "running", "updated": now, "nodes": nodes}}})
    out = ok(tmp_path, "tasks", "show", pipeline.id)
    assert "\nPipeline nightly v1.0.2: running (updated " in out
    assert row_of(out, "STEP") == ["STEP", "STATUS", "TASK", "PARENTS", "DURATION"]
    assert row_of(out, "prepare") == ["prepare", "completed", "t-prepare", "-", "12s"]
    assert row_of(out, "train")[:4] == ["train", "running", step.id, "prepare"]
    assert row_of(out, "train")[4].endswith("(running)")
    assert row_of(out, "report") == ["report", "pending", "-", "prepare, train", "-"]
    assert "y" * 100 not in out  # the recorded state is not dumped as JSON
    assert "Pipeline: (the pipeline's definition, 3 steps: see --json)" in out
    assert '{"a": 1}' in out
    data = json.loads(ok(tmp_path, "tasks", "show", pipeline.id, "--json"))
    assert data["runtime"]["pipeline"]["nodes"]["prepare"]["parameters"] == {"x": "y" * 500}


# ------------------------------------------------------------- which store


def test_the_cli_says_when_it_creates_a_new_store_and_which_store_answered_empty(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "queues", "create", "gpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == (
        f"conveyor: created a new store at {tmp_path / 'conveyor.db'} (the embedded store of "
        "CONVEYOR_HOME; set CONVEYOR_API to use another)"
    )
    again = run_cli(tmp_path, "queues", "create", "cpu")
    assert again.returncode == 0 and again.stderr == ""

    empty = run_cli(tmp_path, "tasks", "list")
    assert empty.stdout.strip() == "No tasks."
    assert empty.stderr.strip() == (
        f"conveyor: this is the embedded store {tmp_path / 'conveyor.db'} (CONVEYOR_API is not set)"
    )
    line = fails(tmp_path, "tasks", "show", "t-42")
    assert line == (f"error: no task with id 't-42' (in the embedded store {tmp_path / 'conveyor.db'}: "
                    "CONVEYOR_API is not set)")
    other = tmp_path / "other.db"
    proc = run_cli(tmp_path, "queues", "create", "gpu", CONVEYOR_API=f"sqlite:///{other}")
    assert proc.stderr.strip() == f"conveyor: created a new store at {other} (from --api or CONVEYOR_API)"
    listed = run_cli(tmp_path, "tasks", "list", CONVEYOR_API=f"sqlite:///{other}")
    assert listed.stdout.strip() == "No tasks." and listed.stderr == ""


# ----------------------------------------------------------------- workers


def test_workers(tmp_path: Path, store) -> None:
    assert "No workers." in ok(tmp_path, "workers")
    store.register_worker("box-1", hostname="box", queues=["default", "services"], slots=2)
    row = row_of(ok(tmp_path, "workers"), "box-1")
    assert row[1:4] == ["box", "default,services", "2"]
    assert row[4].endswith("ago")
    data = json.loads(ok(tmp_path, "workers", "--json"))
    assert [w["id"] for w in data] == ["box-1"]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "args",
    [
        ("tasks", "show"),
        ("tasks", "logs"),
        ("tasks", "enqueue"),
        ("tasks", "abort"),
        ("tasks", "reset"),
    ],
)
def test_unknown_task_is_one_line_error(tmp_path: Path, store, args: tuple[str, ...]) -> None:
    line = fails(tmp_path, *args, "no-such-task-42")
    assert "no-such-task-42" in line


def test_closed_port_is_one_line_error(tmp_path: Path) -> None:
    line = fails(tmp_path, "--api", "http://127.0.0.1:1", "queues")
    assert "http://127.0.0.1:1" in line
    line = fails(tmp_path, "queues", CONVEYOR_API="http://127.0.0.1:1")
    assert "http://127.0.0.1:1" in line


def test_version_and_help(tmp_path: Path) -> None:
    assert "0.1.0" in ok(tmp_path, "--version")
    assert "serve" in ok(tmp_path, "--help")


# ------------------------------------------------------------------- serve


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"controller serve exited: {proc.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"controller serve did not listen on port {port}")


@pytest.mark.slow
def test_serve_and_use_over_http(tmp_path: Path) -> None:
    """`controller serve` with the embedded default store (CONVEYOR_API=http is ignored for
    the store), then the CLI over HTTP, with a token."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "serve",
            "--port",
            str(port),
            "--token",
            "s3cret",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path, CONVEYOR_API=url),
    )
    try:
        _wait_for_port(port, server)
        from controller.store import SqlBackend

        store = SqlBackend(f"sqlite:///{tmp_path}/conveyor.db")  # the default store it serves
        try:
            task = store.create_task({"name": "over-http"})
        finally:
            store.close()

        out = ok(tmp_path, "--api", url, "--token", "s3cret", "queues")
        assert row_of(out, "default")[1] == "0"
        out = ok(tmp_path, "tasks", "list", CONVEYOR_API=url, CONVEYOR_API_TOKEN="s3cret")
        assert row_of(out, task.id)[1] == "over-http"
        ok(tmp_path, "--api", url, "--token", "s3cret", "tasks", "enqueue", task.id)
        assert (
            row_of(ok(tmp_path, "--api", url, "--token", "s3cret", "queues"), "default")[1] == "1"
        )
        assert "no-such-task" in fails(
            tmp_path, "--api", url, "--token", "s3cret", "tasks", "show", "no-such-task"
        )
        fails(tmp_path, "--api", url, "queues")  # no token
    finally:
        server.terminate()
        try:
            _, err = server.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    banner = [line for line in err.splitlines() if line.startswith("Conveyor API on ")]
    assert len(banner) == 1, err
    assert banner[0].startswith(f"Conveyor API on {url} (")
    assert f"sqlite:///{tmp_path}/conveyor.db" in banner[0]


def test_serve_reports_an_unreachable_database(tmp_path: Path) -> None:
    line = fails(
        tmp_path, "serve", "--port", str(_free_port()), "--db", "postgresql://u:pw@127.0.0.1:1/x"
    )
    assert "127.0.0.1:1" in line
    assert "pw" not in line  # the password is hidden


# -------------------------------------------------------------- formatting


def test_format_helpers() -> None:
    assert truncate("abcdefgh", 5) == "abcd…"
    assert truncate("a\nb", 10) == "a b"
    assert format_age(100.0, now=112.0) == "12s ago"
    assert format_age(0.0, now=180.0) == "3m ago"
    assert format_age(200.0, now=180.0) == "in 20s"
    assert format_age(None) == "-"
    assert format_duration(185) == "3m 05s"
    table = format_table(["A", "N"], [["x", 1], ["long", 10]], right=[1])
    assert table.splitlines() == ["A      N", "x      1", "long  10"]
