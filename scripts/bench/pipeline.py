"""Benchmarks of pipelines (issue: PipelineController).

1. DAG edge latency: parent completed → child running (task finished_at → the child's
   started_at, both recorded by the store), in a chain of 20 trivial function steps on
   one agent. p50/p95 over all edges of several runs.
2. Wall time of that chain, and of a 50-step fan-out/fan-in with --concurrency 2.

Usage: python scripts/bench/pipeline.py [--runs R] [--chain N] [--fan N] [--http]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.stats import show  # noqa: E402
from tests.helpers_server import start_server, stop_server  # noqa: E402


def noop(value: int = 0):
    return value + 1


def start_agent(home: Path, concurrency: int = 2) -> subprocess.Popen[bytes]:
    """An agent daemon on queue "default" for the current CONVEYOR_API (log in `home`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "default", "--concurrency", str(concurrency),
         "--foreground"],
        env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=open(home / "agent.log", "wb"), cwd=ROOT,  # noqa: SIM115
    )


def run_pipeline(kind: str, size: int) -> tuple[float, list[float]]:
    """Run one pipeline; returns (wall seconds, edge latencies in ms)."""
    from controller.automation import PipelineController
    from controller.connect import get_backend

    pipe = PipelineController(name=f"bench {kind}", project="bench", version="1.0.0")
    pipe.set_default_execution_queue("default")
    if kind == "chain":
        previous = None
        for i in range(size):
            kwargs = {"value": f"${{{previous}.out}}"} if previous else {"value": 0}
            pipe.add_function_step(f"s{i}", noop, function_kwargs=kwargs, function_return=["out"])
            previous = f"s{i}"
    else:
        pipe.add_function_step("source", noop, function_return=["out"])
        for i in range(size):
            pipe.add_function_step(f"f{i}", noop, function_kwargs={"value": "${source.out}"}, function_return=["out"])
        pipe.add_function_step("sink", noop, parents=[f"f{i}" for i in range(size)], function_return=["out"])
    started = time.perf_counter()
    pipe.start_locally()
    wall = time.perf_counter() - started
    assert pipe.is_successful(), {n: x.status for n, x in pipe.get_pipeline_dag().items()}
    backend = get_backend()
    dag = pipe.get_pipeline_dag()
    tasks = {name: backend.get_task(node.executed) for name, node in dag.items()}
    edges = []
    for name, node in dag.items():
        for parent in node.parents:
            edges.append((tasks[name].started_at - tasks[parent].finished_at) * 1000)
    if kind != "chain":
        edges = [e for name, node in dag.items() if name == "sink" for e in [
            (tasks["sink"].started_at - max(tasks[p].finished_at for p in node.parents)) * 1000]]
    return wall, edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chain", type=int, default=20)
    parser.add_argument("--fan", type=int, default=50)
    parser.add_argument("--http", action="store_true", help="agent and controller over a controller serve process")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="conveyor-bench-pipeline-"))
    os.environ["CONVEYOR_HOME"] = str(home)
    db = f"sqlite:///{home / 'conveyor.db'}"
    server = None
    api = db
    if args.http:
        server, api = start_server(db)
    os.environ["CONVEYOR_API"] = api
    agent = start_agent(home)
    try:
        run_pipeline("chain", 2)  # warm up: builds the steps' venv once
        walls, edges = [], []
        for _ in range(args.runs):
            wall, lat = run_pipeline("chain", args.chain)
            walls.append(wall)
            edges.extend(lat)
        where = "HTTP" if args.http else "embedded SQLite"
        show(f"DAG edge latency, chain of {args.chain} ({where})", edges, "ms")
        show(f"wall time, chain of {args.chain} function steps", walls, "s")
        fan_walls, joins = [], []
        for _ in range(args.runs):
            wall, lat = run_pipeline("fan", args.fan)
            fan_walls.append(wall)
            joins.extend(lat)
        show(f"wall time, fan-out/fan-in of {args.fan} (--concurrency 2)", fan_walls, "s")
        show("fan-in edge latency (last parent → sink running)", joins, "ms")
    finally:
        agent.terminate()
        agent.wait(60)
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    main()
