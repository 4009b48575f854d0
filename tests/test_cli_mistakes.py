"""Mistakes on the command lines (`controller`, `agent`) get one line naming what was wrong
and how to fix it: no traceback (unless --debug), no hang, nothing created by a read.

Real processes (`python -m controller.cli`, `python -m agent.cli`) with CONVEYOR_HOME in
a temporary folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controller.store import SqlBackend
from tests.test_cli import _env, fails, ok, run_cli

CLI_TIMEOUT_S = 60


def run_agent(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `agent ARGS` in a subprocess with CONVEYOR_HOME=home."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
        env=_env(home), timeout=CLI_TIMEOUT_S,
    )


def one_line(proc: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The one `error:` line of a failed command (no traceback)."""
    assert proc.returncode == exit_code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ------------------------------------------------------- a store that is not there

@pytest.mark.parametrize(
    "args",
    [("tasks", "list"), ("tasks", "show", "t1"), ("tasks", "logs", "t1"), ("queues",),
     ("queues", "list"), ("queues", "show", "default"), ("workers",)],
)
def test_a_read_on_a_mistyped_sqlite_path_says_so_and_creates_nothing(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    typo = tmp_path / "stores" / "conveyr.db"
    line = fails(tmp_path, "--api", f"sqlite:///{typo}", *args)
    assert f"no Conveyor store at {typo}" in line and "--api or CONVEYOR_API" in line
    line = fails(tmp_path, *args, CONVEYOR_API=f"sqlite:///{typo}")
    assert f"no Conveyor store at {typo}" in line
    assert not typo.exists() and not typo.parent.exists()


def test_a_read_before_the_embedded_store_exists_says_so(tmp_path: Path) -> None:
    line = fails(tmp_path, "tasks", "list")
    assert f"no Conveyor store yet at {tmp_path / 'conveyor.db'}" in line
    assert not (tmp_path / "conveyor.db").exists()


def test_a_write_creates_the_embedded_store_on_first_use(tmp_path: Path) -> None:
    assert "Created queue gpu." in ok(tmp_path, "queues", "create", "gpu")
    assert (tmp_path / "conveyor.db").exists()
    assert "No tasks." in ok(tmp_path, "tasks", "list")


def test_a_relative_sqlite_path_is_found_from_the_working_folder(tmp_path: Path) -> None:
    SqlBackend(f"sqlite:///{tmp_path}/here.db").close()
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", "--api", "sqlite:///here.db", "queues"],
        capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=CLI_TIMEOUT_S,
    )
    assert proc.returncode == 0 and "default" in proc.stdout, proc.stderr


# ------------------------------------------------------------------- bad API URLs

@pytest.mark.parametrize(
    "url, problem",
    [("http://127.0.0.1:abc", "is not a number from 1 to 65535"), ("http://:8008", "no host"),
     ("http://127.0.0.1:99999", "is not a number from 1 to 65535"),
     ("ftp://x", "use sqlite:///path, postgresql://... or http://host:port")],
)
def test_a_malformed_api_url_is_one_line_naming_it(tmp_path: Path, url: str, problem: str) -> None:
    line = fails(tmp_path, "tasks", "list", CONVEYOR_API=url)
    assert url in line and problem in line
    line = one_line(run_agent(tmp_path, "daemon", "--queue", "default", "--api", url), 1)
    assert url in line and problem in line


def test_debug_adds_the_traceback(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "--debug", "tasks", "list", CONVEYOR_API="http://127.0.0.1:abc")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: invalid Conveyor API URL")
    proc = run_agent(tmp_path, "--debug", "daemon", "--queue", "default",
                     "--api", "http://127.0.0.1:abc")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


# --------------------------------------------------------- usage mistakes: exit 2

@pytest.mark.parametrize(
    "args, needle",
    [(("queues", "create", ""), "'' is not a queue name"),
     (("queues", "create", "a b"), "separate words"),
     (("queues", "show", "x/y"), "'x/y' is not a queue name"),
     (("tasks", "enqueue", "t1", "--queue", "-bad"), "'-bad' is not a queue name"),
     (("tasks", "list", "--status", "nope"), "--status"),
     (("taks",), "No such command 'taks'")],
)
def test_usage_mistakes_are_one_line_with_exit_2(
    tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    line = one_line(run_cli(tmp_path, *args), 2)
    assert needle in line and "--help" in line
    assert not (tmp_path / "conveyor.db").exists()


@pytest.mark.parametrize(
    "queue_args, needle",
    [(("--queue", ""), "'' is not a queue name"),
     (("--queue", "bad name", "--create-queue"), "'bad name' is not a queue name"),
     (("--queue", "good", "bad/name", "--create-queue"), "'bad/name' is not a queue name"),
     (("--queue", "default\n"), "is not a queue name"),
     (("--queue", "default", "--allow-mount", "/tmp"), "--allow-mount only applies"),
     (("--queue", "default", "--docker", "--allow-mount", "/"), "the host's root"),
     (("--queue", "default", "--allow-privileged"), "--allow-privileged only applies")],
)
def test_agent_daemon_refuses_bad_queues_before_touching_the_store(
    tmp_path: Path, queue_args: tuple[str, ...], needle: str
) -> None:
    store = tmp_path / "agent-store.db"
    line = one_line(run_agent(tmp_path, "daemon", *queue_args, "--api", f"sqlite:///{store}"), 2)
    assert needle in line and "agent daemon --help" in line
    assert not store.exists(), "nothing may be created"
    assert not list(tmp_path.glob("agents/*")) and not list(tmp_path.glob("logs/*"))
