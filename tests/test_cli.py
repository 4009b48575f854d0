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
