"""run_step with real processes: outcomes, streaming, time limit, abort, process trees."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.supervisor import StepOutcome, run_step
from controller.models import LogLine, StatusReason


class Collector:
    """An on_output callback that records lines and when they arrived."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def __call__(self, batch: list[dict[str, Any]]) -> None:
        now = time.time()
        with self.lock:
            for item in batch:
                LogLine(**item)  # every item is a valid LogLine
                self.lines.append(item)
                self.arrivals.append((now, item))

    def text(self, stream: str = "stdout") -> list[str]:
        return [x["line"] for x in self.lines if x["stream"] == stream]


def never() -> str | None:
    return None


def run_py(code: str, tmp_path: Path, **kwargs: Any) -> tuple[StepOutcome, Collector]:
    script = tmp_path / "step.py"
    script.write_text(textwrap.dedent(code))
    out = Collector()
    kwargs.setdefault("time_limit_s", 30)
    kwargs.setdefault("should_abort", never)
    outcome = run_step(
        [sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ), on_output=out, **kwargs
    )
    return outcome, out


def test_exit_zero_and_both_streams(tmp_path: Path) -> None:
    outcome, out = run_py(
        """
        import sys
        print("hello")
        print("oops", file=sys.stderr)
    """,
        tmp_path,
    )
    assert (outcome.exit_code, outcome.reason, outcome.signal_name) == (
        0,
        StatusReason.completed,
        None,
    )
    assert out.text("stdout") == ["hello"]
    assert out.text("stderr") == ["oops"]
    assert all(isinstance(x["timestamp"], float) for x in out.lines)


def test_nonzero_exit_code(tmp_path: Path) -> None:
    outcome, _ = run_py("import sys; sys.exit(3)", tmp_path)
    assert outcome.exit_code == 3
    assert outcome.reason == StatusReason.exit_code
    assert outcome.message == "exited with code 3"


def test_killed_by_signal(tmp_path: Path) -> None:
    outcome, _ = run_py("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", tmp_path)
    assert outcome.reason == StatusReason.signal
    assert outcome.signal_name == "SIGSEGV"
    assert outcome.message == "killed by SIGSEGV"


def test_cannot_start(tmp_path: Path) -> None:
    outcome = run_step(["/nonexistent/binary"], tmp_path, None, None, Collector(), never)
    assert outcome.reason == StatusReason.setup_failed
    assert "/nonexistent/binary" in outcome.message


def test_output_streams_while_running(tmp_path: Path) -> None:
    outcome, out = run_py(
        """
        import time
        print("early", time.time())
        time.sleep(2.5)
        print("late")
    """,
        tmp_path,
    )
    assert outcome.reason == StatusReason.completed
    arrived, item = out.arrivals[0]
    assert item["line"].startswith("early")
    printed = float(item["line"].split()[1])
    assert arrived - printed < 1.0, "line delivered more than 1 s after it was printed"
    assert out.text()[-1] == "late"


def test_lines_pending_when_the_step_ended_go_to_the_final_callback(tmp_path: Path) -> None:
    final = Collector()
    outcome, out = run_py(
        """
        import sys, time
        print("while running", flush=True)
        time.sleep(1.0)
        print("last out")
        print("last err", file=sys.stderr)
    """,
        tmp_path,
        on_final_output=final,
    )
    assert outcome.reason == StatusReason.completed
    assert out.text() == ["while running"]  # delivered while the step ran
    assert final.text() == ["last out"] and final.text("stderr") == ["last err"]


def test_very_long_line_is_split(tmp_path: Path) -> None:
    outcome, out = run_py(
        """
        import sys
        sys.stdout.write("x" * 2_500_000 + "\\nafter\\n")
    """,
        tmp_path,
    )
    assert outcome.reason == StatusReason.completed
    lines = out.text()
    assert [len(x) for x in lines] == [1024 * 1024, 1024 * 1024, 2_500_000 - 2 * 1024 * 1024, 5]
    assert lines[-1] == "after"


def test_carriage_return_progress_bar(tmp_path: Path) -> None:
    outcome, out = run_py(
        """
        import sys
        print("start")
        for i in range(1, 501):
            sys.stdout.write(f"\\rprogress {i}/500")
        sys.stdout.write("\\n")
        sys.stdout.write("crlf line\\r\\n")
        print("end")
    """,
        tmp_path,
    )
    assert outcome.reason == StatusReason.completed
    lines = out.text()
    assert lines[0] == "start" and lines[-2:] == ["crlf line", "end"]
    progress = lines[1:-2]
    assert progress[-1] == "progress 500/500"
    assert len(progress) < 50, "superseded progress updates should be collapsed"
    assert "" not in lines


def test_invalid_utf8_is_replaced(tmp_path: Path) -> None:
    outcome, out = run_py(
        r"""
        import sys
        sys.stdout.buffer.write(b"bad \xff byte\n")
    """,
        tmp_path,
    )
    assert out.text() == ["bad \ufffd byte"]


TREE_STEP = """
    import os, signal, subprocess, sys, time
    pids = sys.argv[1]
    if len(sys.argv) > 2:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child that resists SIGTERM
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\\n")
        if sys.argv[2] == "child":
            # the grandchild leaves the process group (its own session)
            subprocess.Popen([sys.executable, __file__, pids, "grandchild"], start_new_session=True)
        time.sleep(300)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pids, "a") as f:
        f.write(f"{os.getpid()}\\n")
    subprocess.Popen([sys.executable, __file__, pids, "child"])
    print("tree started", flush=True)
    time.sleep(300)
"""


def _wait_for_lines(path: Path, count: int, timeout: float = 10.0) -> list[int]:
    deadline = time.time() + timeout
    while True:
        if path.exists():
            pids = [int(x) for x in path.read_text().split()]
            if len(pids) >= count:
                return pids
        if time.time() >= deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"only {path.read_text() if path.exists() else ''!r} in {path}")


def _assert_all_gone(pids: list[int]) -> None:
    for pid in pids:
        if psutil.pid_exists(pid):
            try:
                status = psutil.Process(pid).status()
            except psutil.NoSuchProcess:
                continue
            assert status == psutil.STATUS_ZOMBIE, f"process {pid} of the step is still {status}"


def test_time_limit_kills_whole_tree(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids.txt"
    script = tmp_path / "tree.py"
    script.write_text(textwrap.dedent(TREE_STEP))
    out = Collector()
    started = time.monotonic()
    outcome = run_step(
        [sys.executable, str(script), str(pid_file)], tmp_path, None, 2.0, out, never, grace_s=1.0
    )
    elapsed = time.monotonic() - started
    pids = _wait_for_lines(pid_file, 3, timeout=0)
    assert outcome.reason == StatusReason.time_limit
    assert outcome.message == "time limit exceeded: the step ran longer than its limit of 2 s"
    assert outcome.signal_name == "SIGKILL"  # it ignored SIGTERM
    assert 2.0 <= elapsed <= 2.0 + 1.0 + 1.0
    assert "tree started" in out.text()
    _assert_all_gone(pids)


def test_abort_callback_stops_the_step(tmp_path: Path) -> None:
    flag = threading.Event()
    threading.Timer(0.5, flag.set).start()
    started = time.monotonic()
    outcome, out = run_py(
        """
        import time
        print("working")
        time.sleep(60)
    """,
        tmp_path,
        should_abort=lambda: StatusReason.aborted if flag.is_set() else None,
        grace_s=2.0,
    )
    assert outcome.reason == StatusReason.aborted
    assert outcome.signal_name == "SIGTERM"
    assert time.monotonic() - started < 3.0
    assert out.text() == ["working"]


def test_leftover_background_child_is_cleaned_up(tmp_path: Path) -> None:
    """A step that exits while a child still holds its stdout does not hang the agent."""
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    outcome, _ = run_py(
        f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
        time.sleep(1.5)  # long enough to be seen by a process-table snapshot
    """,
        tmp_path,
        grace_s=1.0,
    )
    assert outcome.reason == StatusReason.completed
    assert time.monotonic() - started < 6.0
    _assert_all_gone([int(pid_file.read_text())])


def test_failing_output_callback_does_not_break_the_step(tmp_path: Path) -> None:
    def broken(batch: list[dict[str, Any]]) -> None:
        raise RuntimeError("backend down")

    script = tmp_path / "s.py"
    script.write_text("print('x')\n")
    outcome = run_step([sys.executable, str(script)], tmp_path, None, 10, broken, never)
    assert outcome.reason == StatusReason.completed
    assert outcome.output_error == "RuntimeError: backend down"


@pytest.mark.parametrize("limit", [None, 5.0])
def test_quick_step_returns_quickly(tmp_path: Path, limit: float | None) -> None:
    started = time.monotonic()
    outcome, out = run_py("print('hi')", tmp_path, time_limit_s=limit)
    assert outcome.reason == StatusReason.completed and out.text() == ["hi"]
    assert time.monotonic() - started < 2.0


def test_step_dies_with_the_agent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: killing the agent (SIGKILL, no cleanup) kills the step."""
    pid_file = tmp_path / "pid"
    step = tmp_path / "step.py"
    step.write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(300)\n"
    )
    agent = tmp_path / "fake_agent.py"
    agent.write_text(
        textwrap.dedent(f"""
        import sys
        from agent.supervisor import run_step
        run_step([sys.executable, {str(step)!r}], {str(tmp_path)!r}, None, None,
                 lambda batch: None, lambda: None)
    """)
    )
    proc = subprocess.Popen([sys.executable, str(agent)])
    try:
        deadline = time.time() + 10
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        step_pid = int(pid_file.read_text())
        assert psutil.pid_exists(step_pid)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 3
    while time.time() < deadline:
        try:
            if psutil.Process(step_pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    _assert_all_gone([step_pid])
