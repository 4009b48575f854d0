"""Benchmarks of the agent (issue: agent daemon).

1. Dispatch latency: enqueue → first line of the step running (the step prints its own
   start time), warm agent, cached venv; embedded store and over HTTP. p50/p95.
2. Environment: time to a ready venv on a cache hit and on a miss, side by side with a
   bare `uv venv` + `uv pip install` of the same packages (same wheelhouse, same uv cache).
3. Throughput of trivial steps through one daemon with --concurrency 2 (steps/s).

Usage: python scripts/bench/agent.py [--samples N] [--steps N] [--runs R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.environments.venv import ensure_venv, find_uv  # noqa: E402
from controller.backend import Backend  # noqa: E402
from controller.connect import backend_from_url  # noqa: E402
from scripts.bench.stats import show  # noqa: E402
from tests.helpers_server import start_server, stop_server  # noqa: E402

STEP = "import time\nprint('started', repr(time.time()), flush=True)\n"
BENCH_PACKAGES = ["six", "idna", "certifi", "attrs"]




def start_daemon(api: str, home: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CONVEYOR_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "default", "--foreground", "--api", api, *args],
        env=env, stdout=subprocess.DEVNULL, stderr=open(home / "agent.log", "ab"), cwd=ROOT,  # noqa: SIM115
    )


def wait_done(backend: Backend, task_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not backend.get_task(task_id).status.is_terminal:
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id} did not finish")
        time.sleep(0.01)


def dispatch_latencies(api: str, home: Path, samples: int) -> list[float]:
    """Milliseconds from the enqueue call to the step's first line (its own clock)."""
    backend = backend_from_url(api)
    daemon = start_daemon(api, home)
    try:
        warm = backend.create_task({"name": "warm", "script": {"code": STEP, "entry_point": "s.py"}})
        backend.enqueue(warm.id)
        wait_done(backend, warm.id)  # builds the venv once
        results = []
        for _ in range(samples):
            task = backend.create_task({"name": "d", "script": {"code": STEP, "entry_point": "s.py"}})
            time.sleep(0.05)  # the agent is idle, parked in its long-poll claim
            sent = time.time()
            backend.enqueue(task.id)
            wait_done(backend, task.id)
            line = next(x.line for x in backend.get_log(task.id) if x.line.startswith("started"))
            results.append((float(line.split()[1]) - sent) * 1000)
        return results
    finally:
        daemon.terminate()
        daemon.wait(60)
        backend.close()


def step_throughput(api: str, home: Path, steps: int) -> float:
    """Trivial steps per second through one daemon with --concurrency 2."""
    backend = backend_from_url(api)
    daemon = start_daemon(api, home, "--concurrency", "2")
    try:
        warm = backend.create_task({"name": "warm", "script": {"code": "pass\n", "entry_point": "s.py"}})
        backend.enqueue(warm.id)
        wait_done(backend, warm.id)
        ids = [backend.create_task({"name": "t", "script": {"code": "pass\n", "entry_point": "s.py"}}).id
               for _ in range(steps)]
        started = time.perf_counter()
        for task_id in ids:
            backend.enqueue(task_id)
        for task_id in ids:
            wait_done(backend, task_id)
        return steps / (time.perf_counter() - started)
    finally:
        daemon.terminate()
        daemon.wait(60)
        backend.close()


def environment_times(work: Path, runs: int) -> None:
    """Cache hit, cache miss, and bare uv, on the same wheelhouse and uv cache."""
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), *BENCH_PACKAGES],
                   check=True)
    index_args = ["--no-index", "--find-links", str(wheels)]
    uv = find_uv()
    assert uv, "uv is not installed"
    misses, hits, bare = [], [], []
    cache_root = work / "cache"
    env = {**os.environ, "UV_CACHE_DIR": str(cache_root / "uv-cache")}

    def bare_uv(target: Path) -> float:
        started = time.perf_counter()
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(target)], check=True, env=env)
        subprocess.run([uv, "pip", "install", "-q", "--python", str(target / "bin" / "python"),
                        *index_args, *BENCH_PACKAGES], check=True, env=env)
        return (time.perf_counter() - started) * 1000

    # Once with an empty uv cache each (what a new machine pays once); these builds also
    # fill the uv cache, so the figures below compare warm-cache builds on both sides.
    cold_bare = bare_uv(work / "bare-cold")
    shutil.rmtree(cache_root / "uv-cache")
    started = time.perf_counter()
    ensure_venv(sys.executable, BENCH_PACKAGES, None, cache_root, lambda _line: None,
                index_args=index_args).release()
    cold_miss = (time.perf_counter() - started) * 1000
    for run in range(runs):
        shutil.rmtree(cache_root / "venvs", ignore_errors=True)
        started = time.perf_counter()
        result = ensure_venv(sys.executable, BENCH_PACKAGES, None, cache_root, lambda _line: None,
                             index_args=index_args)
        misses.append((time.perf_counter() - started) * 1000)
        assert not result.cache_hit
        result.release()
        started = time.perf_counter()
        result = ensure_venv(sys.executable, BENCH_PACKAGES, None, cache_root, lambda _line: None,
                             index_args=index_args)
        hits.append((time.perf_counter() - started) * 1000)
        assert result.cache_hit
        result.release()
        bare.append(bare_uv(work / f"bare-{run}"))
    show(f"venv cache miss, empty uv cache (once; bare uv {cold_bare:.0f} ms)", [cold_miss], "ms")
    show(f"venv cache hit ({len(BENCH_PACKAGES)} packages)", hits, "ms")
    show(f"venv cache miss ({len(BENCH_PACKAGES)} packages, warm uv cache)", misses, "ms")
    show("bare uv venv + uv pip install, same packages", bare, "ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=30, help="dispatch latency samples per transport")
    parser.add_argument("--steps", type=int, default=100, help="steps per throughput run")
    parser.add_argument("--runs", type=int, default=3, help="runs of the throughput and environment figures")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-agent-"))
    home = work / "home"
    home.mkdir()

    embedded = f"sqlite:///{work / 'embedded.db'}"
    show("dispatch enqueue → first line, embedded SQLite", dispatch_latencies(embedded, home, args.samples), "ms")
    proc, url = start_server(f"sqlite:///{work / 'served.db'}")
    try:
        show("dispatch enqueue → first line, HTTP", dispatch_latencies(url, home, args.samples), "ms")
        show("trivial steps/s, one daemon, --concurrency 2, HTTP",
             [step_throughput(url, home, args.steps) for _ in range(args.runs)], "steps/s")
    finally:
        stop_server(proc)
    show("trivial steps/s, one daemon, --concurrency 2, embedded",
         [step_throughput(embedded, home, args.steps) for _ in range(args.runs)], "steps/s")
    environment_times(work, args.runs)


if __name__ == "__main__":
    main()
