"""Benchmark of docker steps: enqueue → first line printed inside the container.

One `agent daemon --docker` on the embedded store (and, with --http, one behind a
`controller serve`), an idle agent parked in its long-poll claim, then per sample: enqueue
a task whose step prints `time.time()` as its first line, wait for it to finish, and take
(the step's clock − the enqueue time). Container and host share one kernel clock.

- cold: the container venv cache (venvs and uv cache) is emptied before each run, so the
  agent builds the venv (image's Python, one package from a local wheelhouse) every time;
- warm: venv cache hit (the usual case);
- host: the same step in a host venv (cache hit), for comparison.

Needs a docker engine and the image (scripts/ci/docker-setup.sh). Offline.
Usage: python scripts/bench/docker.py [--runs 10] [--image conveyor-test/python:3.11] [--http]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controller.backend import Backend  # noqa: E402
from controller.connect import backend_from_url  # noqa: E402
from tests.helpers_server import start_server, stop_server  # noqa: E402
from tests.test_agent_venv import make_wheel  # noqa: E402

STEP = "import time\nprint('started', repr(time.time()), flush=True)\nimport tinypkg\n"


def start_daemon(api: str, home: Path, wheels: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CONVEYOR_HOME": str(home),
           "CONVEYOR_PIP_ARGS": f"--no-index --find-links {wheels}"}
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "default", "--foreground",
         "--api", api, *args],
        env=env, stdout=subprocess.DEVNULL, stderr=open(home / "agent.log", "ab"),  # noqa: SIM115
        cwd=ROOT,
    )


def one_run(backend: Backend, image: str | None) -> float:
    """Milliseconds from the enqueue call to the step's first line (its own clock)."""
    spec = {"name": "bench", "script": {"code": STEP, "entry_point": "s.py"},
            "packages": ["tinypkg==1.0"]}
    if image:
        spec["container"] = {"image": image}
    task = backend.create_task(spec)
    time.sleep(0.1)  # the agent is idle, parked in its long-poll claim
    sent = time.time()
    backend.enqueue(task.id)
    deadline = time.monotonic() + 300
    while not (record := backend.get_task(task.id)).status.is_terminal:
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task.id} did not finish")
        time.sleep(0.01)
    log = backend.get_log(task.id)
    if record.status.value != "completed":
        raise RuntimeError(f"bench task {record.status.value}: {record.status_message}\n"
                           + "\n".join(x.line for x in log[-20:]))
    line = next(x.line for x in log if x.line.startswith("started"))
    return (float(line.split()[1]) - sent) * 1000


def show(name: str, values: list[float]) -> None:
    print(f"{name:<50} p50 {statistics.median(values):>8.0f} ms   min {min(values):>7.0f}   "
          f"max {max(values):>7.0f}   (n={len(values)})", flush=True)


def bench(api: str, home: Path, wheels: Path, image: str, runs: int, label: str) -> None:
    backend = backend_from_url(api)
    daemon = start_daemon(api, home, wheels, "--docker")
    cache = home / "cache" / "docker"
    try:
        first = one_run(backend, image)  # the agent's API server starts, venv cold
        cold = []
        for _ in range(runs):
            for sub in ("venvs", "uv-cache", "pip-cache"):
                shutil.rmtree(cache / sub, ignore_errors=True)
            cold.append(one_run(backend, image))
        warm = [one_run(backend, image) for _ in range(runs)]
        one_run(backend, None)  # build the host venv once
        host = [one_run(backend, None) for _ in range(runs)]
    finally:
        daemon.terminate()
        daemon.wait(60)
        backend.close()
    print(f"{label}: first container task of the agent: {first:.0f} ms "
          "(starts the agent's API server for containers; cold venv)")
    show(f"{label}: container, cold (venv built)", cold)
    show(f"{label}: container, warm (venv cache hit)", warm)
    show(f"{label}: host venv, warm (for comparison)", host)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--image", default=os.environ.get("CONVEYOR_TEST_IMAGE",
                                                          "conveyor-test/python:3.11"))
    parser.add_argument("--http", action="store_true", help="also through `controller serve`")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-docker-") as tmp:
        wheels = Path(tmp) / "wheels"
        make_wheel(wheels, "tinypkg", "1.0", "VALUE = 1\n")
        home = Path(tmp) / "home"
        home.mkdir()
        db = f"sqlite:///{home / 'conveyor.db'}"
        bench(db, home, wheels, args.image, args.runs, "embedded store")
        if args.http:
            proc, url = start_server(db)
            try:
                bench(url, home, wheels, args.image, args.runs, "http API")
            finally:
                stop_server(proc)


if __name__ == "__main__":
    main()
