"""The warm path (agent.forkserver): steps forked from a venv's warm interpreter keep the
isolation, limits and output capture of a cold start.

Real parts only: a venv built by `ensure_venv` (as the agent builds it), a real fork
server process, steps supervised by `run_step`, and one daemon running a task.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.environments.venv import MARKER_NAME, VenvResult, ensure_venv
from agent.forkserver import ForkServers
from agent.supervisor import LastExceptionLine, StepOutcome, run_step
from controller.models import StatusReason


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VenvResult]:
    """A step venv with the SDK linked, as the agent builds it."""
    result = ensure_venv(sys.executable, [], None, tmp_path_factory.mktemp("cache"), lambda _line: None)
    yield result
    result.release()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ForkServers]:
    servers = ForkServers(f"sqlite:///{tmp_path / 'conveyor.db'}")
    yield servers
    servers.stop_all()


def step_env(tmp_path: Path, venv: VenvResult, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(VIRTUAL_ENV=str(venv.path), PYTHONUNBUFFERED="1", CONVEYOR_HOME=str(tmp_path), **extra)
    return env


class Step:
    """One step run through `run_step` with the fork servers as launcher."""

    def __init__(self, outcome: StepOutcome, lines: list[dict[str, Any]], said: list[str], exception: str | None):
        self.outcome, self.lines, self.said, self.exception = outcome, lines, said, exception

    def text(self, stream: str = "stdout") -> list[str]:
        return [x["line"] for x in self.lines if x["stream"] == stream]

    @property
    def forked(self) -> bool:
        return any(line.startswith("forked by the fork server") for line in self.said)


def run(servers: ForkServers, venv: VenvResult, tmp_path: Path, code: str, *, args: tuple[str, ...] = (),
        env: dict[str, str] | None = None, **kwargs: Any) -> Step:
    script = tmp_path / "step.py"
    script.write_text(textwrap.dedent(code))
    lines: list[dict[str, Any]] = []
    said: list[str] = []
    exception = LastExceptionLine()
    kwargs.setdefault("time_limit_s", 60)
    kwargs.setdefault("should_abort", lambda: None)
    python = venv.python_path
    outcome = run_step(
        [str(python), "step.py", *args], tmp_path, env or step_env(tmp_path, venv),
        on_output=exception.watching(lines.extend),
        launch=lambda argv, cwd, e: servers.launch(python, argv, cwd, e, said.append),
        **kwargs,
    )
    return Step(outcome, lines, said, exception.line)


def server_pid(step: Step) -> int:
    line = next(x for x in step.said if x.startswith("forked by"))
    return int(line.rsplit("pid ", 1)[1].rstrip(")"))


def test_a_step_is_forked_with_its_argv_cwd_environment_and_the_sdk_preloaded(
        servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    step = run(servers, venv, tmp_path, """
        import os, sys
        print("argv", sys.argv)
        print("cwd", os.getcwd())
        print("path0", sys.path[0])
        print("env", os.environ["STEP_VALUE"], os.environ["VIRTUAL_ENV"])
        print("preloaded", "controller.models" in sys.modules, "pydantic" in sys.modules)
        print("group", os.getpgid(0) == os.getpid(), os.getsid(0) == os.getpid())
        print("file", __file__, __name__)
    """, args=("a", "b c"), env=step_env(tmp_path, venv, STEP_VALUE="42"))
    assert step.forked, step.said
    assert step.outcome.reason == StatusReason.completed, step.text("stderr")
    assert step.text() == [
        "argv ['step.py', 'a', 'b c']",
        f"cwd {tmp_path}",
        f"path0 {tmp_path}",
        f"env 42 {venv.path}",
        "preloaded True True",
        "group True True",
        f"file {tmp_path / 'step.py'} __main__",
    ]


def test_changes_of_one_step_do_not_reach_the_next(servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    first = run(servers, venv, tmp_path, """
        import os, sys, types
        import controller.models
        controller.models.CHANGED_BY_A_STEP = True
        os.environ["LEFT_BY_A_STEP"] = "1"
        sys.modules["left_by_a_step"] = types.ModuleType("left_by_a_step")
        sys.path.append("/left/by/a/step")
        os.chdir("sub")
        os.umask(0o077)
        print("changed")
    """)
    second = run(servers, venv, tmp_path, """
        import os, sys
        import controller.models
        print(hasattr(controller.models, "CHANGED_BY_A_STEP"), "LEFT_BY_A_STEP" in os.environ,
              "left_by_a_step" in sys.modules, "/left/by/a/step" in sys.path, os.getcwd())
        mask = os.umask(0); print(oct(mask))
    """)
    assert first.forked and second.forked
    assert server_pid(first) == server_pid(second)
    assert first.text() == ["changed"]
    assert second.text()[0] == f"False False False False {tmp_path}"
    assert second.text()[1] != "0o77"


def test_output_is_captured_fully_and_the_exit_code_is_the_steps(
        servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    step = run(servers, venv, tmp_path, """
        import os, sys
        for i in range(3000):
            print(f"out {i}")
            print(f"err {i}", file=sys.stderr)
        sys.stdout.write("no newline at the end")
        sys.exit(3)
    """)
    assert step.forked
    assert step.outcome.exit_code == 3 and step.outcome.reason == StatusReason.exit_code
    assert step.text() == [f"out {i}" for i in range(3000)] + ["no newline at the end"]
    assert step.text("stderr") == [f"err {i}" for i in range(3000)]


def test_an_exception_reads_like_a_cold_starts(servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    step = run(servers, venv, tmp_path, """
        def fail():
            raise ValueError("bad input")
        fail()
    """)
    assert step.forked
    assert step.outcome.exit_code == 1
    assert step.exception == "ValueError: bad input"
    stderr = step.text("stderr")
    assert stderr[0] == "Traceback (most recent call last):"
    assert "forkserver" not in "\n".join(stderr) and "runpy" not in "\n".join(stderr)
    assert stderr[1].startswith(f'  File "{tmp_path / "step.py"}"')


def test_a_crash_does_not_take_the_fork_server_down(servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    exited = run(servers, venv, tmp_path, "import os\nprint('bye', flush=True)\nos._exit(7)\n")
    crashed = run(servers, venv, tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    after = run(servers, venv, tmp_path, "print('still here')\n")
    assert exited.forked and crashed.forked and after.forked
    assert exited.outcome.exit_code == 7 and exited.text() == ["bye"]
    assert crashed.outcome.reason == StatusReason.signal and crashed.outcome.signal_name == "SIGSEGV"
    assert after.outcome.reason == StatusReason.completed and after.text() == ["still here"]
    assert server_pid(exited) == server_pid(crashed) == server_pid(after)


def test_a_killed_fork_server_is_started_again(servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    first = run(servers, venv, tmp_path, "print('one')\n")
    os.kill(server_pid(first), signal.SIGKILL)
    psutil.Process(server_pid(first)).wait(10) if psutil.pid_exists(server_pid(first)) else None
    second = run(servers, venv, tmp_path, "print('two')\n")
    assert second.forked and second.text() == ["two"]
    assert server_pid(second) != server_pid(first)


def test_a_rebuilt_venv_gets_a_new_fork_server(servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    first = run(servers, venv, tmp_path, "print('one')\n")
    marker = venv.path / MARKER_NAME
    replacement = marker.with_name(".marker.new")
    replacement.write_bytes(marker.read_bytes())
    os.replace(replacement, marker)  # what a rebuild at the same path publishes
    second = run(servers, venv, tmp_path, "print('two')\n")
    assert second.forked and server_pid(second) != server_pid(first)
    assert not psutil.pid_exists(server_pid(first)) or psutil.Process(server_pid(first)).wait(10) is not None


def test_a_time_limit_kills_a_forked_step_and_its_children(
        servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    run(servers, venv, tmp_path, "pass\n")  # the server is up: the limit is the step's own
    step = run(servers, venv, tmp_path, """
        import subprocess, time
        child = subprocess.Popen(["sleep", "60"])
        print("child", child.pid, flush=True)
        time.sleep(60)
    """, time_limit_s=2.0, grace_s=1.0)
    assert step.forked
    assert step.outcome.reason == StatusReason.time_limit
    child = int(step.text()[0].split()[1])
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_an_abort_kills_a_forked_step(servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    asked = threading.Event()

    run(servers, venv, tmp_path, "pass\n")
    started = time.monotonic()

    def should_abort() -> str | None:
        if time.monotonic() - started > 1.5:
            asked.set()
            return StatusReason.aborted
        return None

    step = run(servers, venv, tmp_path, """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
        print("running", flush=True)
        time.sleep(60)
    """, should_abort=should_abort, grace_s=0.5)
    assert step.forked and asked.is_set()
    assert step.outcome.reason == StatusReason.aborted
    assert step.text() == ["running"]
    assert time.monotonic() - started < 20


def test_what_a_fork_cannot_reproduce_starts_cold(servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    script = tmp_path / "step.py"
    script.write_text("import sys\nprint(sys.flags.optimize)\n")
    said: list[str] = []
    lines: list[dict[str, Any]] = []
    python = venv.python_path
    outcome = run_step([str(python), "-O", "step.py"], tmp_path, step_env(tmp_path, venv), 30, lines.extend,
                       lambda: None, launch=lambda a, c, e: servers.launch(python, a, c, e, said.append))
    assert outcome.reason == StatusReason.completed and [x["line"] for x in lines] == ["1"]
    assert said == []  # interpreter options: started cold, as before
    previous = os.umask(0o027)
    try:
        step = run(servers, venv, tmp_path, "import os\nprint(oct(os.umask(0)))\n")
    finally:
        os.umask(previous)
    assert step.forked and step.text() == ["0o27"]  # the server started under this umask
    cold = run(servers, venv, tmp_path, "import os\nprint(oct(os.umask(0)))\n")
    assert any("umask changed" in x for x in cold.said) and not cold.forked
    assert cold.text() == [oct(previous)]


def test_a_forked_step_ends_as_a_cold_one_does(servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    step = run(servers, venv, tmp_path, """
        import atexit, sys, threading, time
        left_open = open("left-open.txt", "w")
        left_open.write("kept")  # buffered, never closed: flushed at exit as a teardown would
        atexit.register(lambda: print("exit handler ran", flush=True))

        def late() -> None:
            time.sleep(0.5)
            print("non-daemon thread finished", flush=True)

        threading.Thread(target=late).start()
        sys.exit("stopped with a message")
    """)
    assert step.forked
    assert step.outcome.exit_code == 1, step.text("stderr")
    assert step.text() == ["non-daemon thread finished", "exit handler ran"]
    assert step.text("stderr") == ["stopped with a message"]
    assert (tmp_path / "left-open.txt").read_text() == "kept"
    assert run(servers, venv, tmp_path, "raise SystemExit(300)\n").outcome.exit_code == 300 % 256


def test_forked_steps_find_the_embedded_store_opened(
        servers: ForkServers, venv: VenvResult, tmp_path: Path) -> None:
    from controller.store import SqlBackend

    url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    store = SqlBackend(url)
    env = step_env(tmp_path, venv, CONVEYOR_API=url)
    code = """
        from controller.connect import get_backend
        backend = get_backend()
        task = backend.create_task({"name": "made by a forked step", "project": "p"})
        backend.append_log(task.id, ["hello"])
        print(task.id)
    """
    first, second = run(servers, venv, tmp_path, code, env=env), run(servers, venv, tmp_path, code, env=env)
    assert first.forked and second.forked, first.said
    assert first.outcome.reason == second.outcome.reason == StatusReason.completed, first.text("stderr")
    for step in (first, second):
        (task_id,) = step.text()
        assert store.get_task(task_id).name == "made by a forked step"
        assert [x.line for x in store.get_log(task_id)] == ["hello"]
    store.close()
