"""`make demo`: run steps on a real agent against the embedded store, in a temp home.

1. makes a throw-away CONVEYOR_HOME (the embedded SQLite store lives there);
2. starts `agent daemon --queue default` in the background;
3. creates three tasks from examples/steps/count_words.py with different TOP_N
   overrides, enqueues them, and waits for them;
4. prints each task's status and log, then stops the agent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="conveyor-demo-"))
    os.environ["CONVEYOR_HOME"] = str(home)
    os.environ.pop("CONVEYOR_API", None)
    from controller.backend import backend_from_url

    backend = backend_from_url()
    print(f"embedded store: {backend.url}")
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "default", "--foreground"],
        env=os.environ.copy(), stderr=open(home / "agent.log", "wb"), cwd=ROOT,  # noqa: SIM115
    )
    code = (ROOT / "examples" / "steps" / "count_words.py").read_text()
    tasks = []
    for top_n in (3, 5, 8):
        task = backend.create_task({
            "name": f"count words (top {top_n})",
            "project": "demo",
            "type": "data_processing",
            "script": {"code": code, "entry_point": "count_words.py"},
            "hyperparams": {"Environment": {"TOP_N": top_n}},
            "execution": {"time_limit_s": 120},
        })
        tasks.append(backend.enqueue(task.id).id)
    print(f"enqueued {len(tasks)} tasks on 'default'; agent pid {agent.pid}")
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            states = [backend.get_task(t) for t in tasks]
            if all(t.status.is_terminal for t in states):
                break
            time.sleep(0.2)
        ok = True
        for task in (backend.get_task(t) for t in tasks):
            took = (task.finished_at or 0) - (task.started_at or 0)
            print(f"\n== {task.name}: {task.status.value} ({task.status_message}) in {took:.2f} s "
                  f"on {task.runtime.worker}")
            for line in backend.get_log(task.id):
                if line.stream != "agent":
                    print(f"   {line.line}")
            ok = ok and task.status.value == "completed"
    finally:
        agent.terminate()
        agent.wait(60)
    print(f"\nagent stopped; store and logs kept in {home}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
