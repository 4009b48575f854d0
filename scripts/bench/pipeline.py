"""Benchmarks of pipelines (issues: PipelineController, 17), cold and warm step starts side by side.

Every figure is taken twice: with a cold start of every step (the agent started with
`CONVEYOR_FORK_SERVER=0`: a new interpreter per step) and with the warm path (the
default: the step forked by its venv's fork server, `agent.forkserver`). p50/p95.

1. Chain of `--chain` trivial function steps on one agent (`PipelineController` started
   locally, steps on queue "default"): wall time, per step (wall / steps), DAG edge
   (parent finished → child started, both recorded by the store) and the CPU time of
   the agent's process tree (agent, fork server, steps) per step.
2. One function step, phase by phase, run by the agent: a probe doing what
   `run_function_step` does with a clock between the phases (`steps.STEP_PROBE`):
   start (claimed → the script's first line: checkout, venv lookup, spawn or fork,
   interpreter start), import, store open, init (`Task.init`), inputs (the parent's
   artifact), function, outputs (`upload_artifact`), report (a scalar), and end (last
   line → the task finished: exit, atexit flushes, the agent's report). CPU time per
   phase and the step process's whole CPU time at its last line.
3. Dispatch of a script step: enqueue → the step's first line (`agent.py`'s figure).
4. Optionally (`--fan N`) the wall time of an N-step fan-out/fan-in with --concurrency 2.

`--http` runs everything against a `controller serve` process instead of the embedded
store. The machine may be loaded: compare CPU times as well as wall times.

Usage: python scripts/bench/pipeline.py [--runs R] [--chain N] [--probes N] [--fan N] [--http]
                                        [--mode both|cold|warm]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.stats import show  # noqa: E402
from scripts.bench.trivial_steps import noop  # noqa: E402
from tests.helpers_server import start_server, stop_server  # noqa: E402

FORK_SERVER_VARIABLE = "CONVEYOR_FORK_SERVER"


def start_agent(home: Path, concurrency: int = 2) -> subprocess.Popen[bytes]:
    """An agent daemon on queue "default" for the current CONVEYOR_API (log in `home`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "default", "--concurrency", str(concurrency),
         "--foreground"],
        env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=open(home / "agent.log", "ab"), cwd=ROOT,  # noqa: SIM115
    )


@contextmanager
def fork_servers(warm: bool) -> Iterator[None]:
    """Agents started inside use fork servers (warm) or start every step cold."""
    previous = os.environ.get(FORK_SERVER_VARIABLE)
    os.environ[FORK_SERVER_VARIABLE] = "1" if warm else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(FORK_SERVER_VARIABLE, None)
        else:
            os.environ[FORK_SERVER_VARIABLE] = previous


@contextmanager
def agent_running(home: Path, concurrency: int = 2) -> Iterator[subprocess.Popen[bytes]]:
    """An agent (see `start_agent`), stopped at the end."""
    agent = start_agent(home, concurrency)
    try:
        yield agent
    finally:
        agent.terminate()
        agent.wait(60)


def tree_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the agent `pid` itself and of the rest of its tree
    (fork servers, watchdog, and every step they or the agent reaped)."""
    split = {"agent": 0.0, "steps": 0.0}
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return split
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        if proc.pid == pid:
            split["agent"] += times.user + times.system
            split["steps"] += times.children_user + times.children_system
        else:
            split["steps"] += times.user + times.system + times.children_user + times.children_system
    return split


def run_pipeline(kind: str, size: int) -> tuple[float, list[float], float]:
    """Run one pipeline; returns (wall seconds, edge latencies in ms, the slowest step's
    run in ms: started → finished)."""
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
    slowest_step_ms = max((t.finished_at - t.started_at) * 1000 for t in tasks.values())
    return wall, edges, slowest_step_ms


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds of one process so far (0 without one)."""
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def chain_figures(agent: subprocess.Popen[bytes], size: int, runs: int, label: str,
                  server_pid: int | None = None) -> None:
    """Figure 1 for one agent (and the API server's CPU, with `server_pid`)."""
    run_pipeline("chain", 2)  # warm up: the steps' venv (and its fork server)
    walls, edges, agent_cpu, steps_cpu, own_cpu, server_cpu = [], [], [], [], [], []
    for _ in range(runs):
        cpu_before, own_before = tree_cpu_s(agent.pid), time.process_time()
        server_before = process_cpu_s(server_pid)
        wall, latencies, slowest_step_ms = run_pipeline("chain", size)
        cpu_after = tree_cpu_s(agent.pid)
        own_cpu.append((time.process_time() - own_before) / size * 1000)
        server_cpu.append((process_cpu_s(server_pid) - server_before) / size * 1000)
        agent_cpu.append((cpu_after["agent"] - cpu_before["agent"]) / size * 1000)
        steps_cpu.append((cpu_after["steps"] - cpu_before["steps"]) / size * 1000)
        walls.append(wall)
        edges.extend(latencies)
        print(f"[{label}]   run {len(walls)}: {wall:.2f} s, slowest edge {max(latencies):.1f} ms, "
              f"slowest step {slowest_step_ms:.0f} ms", flush=True)
    show(f"[{label}] wall time, chain of {size} function steps", walls, "s")
    show(f"[{label}]   per step (wall / steps)", [w / size * 1000 for w in walls], "ms")
    show(f"[{label}]   DAG edge (parent finished → child started)", edges, "ms")
    show(f"[{label}]   CPU per step: the agent daemon", agent_cpu, "ms")
    show(f"[{label}]   CPU per step: step processes (+ fork server, watchdog)", steps_cpu, "ms")
    show(f"[{label}]   CPU per step: the pipeline controller (this process)", own_cpu, "ms")
    if server_pid is not None:
        show(f"[{label}]   CPU per step: the API server", server_cpu, "ms")


def probe_figures(probes: int, label: str) -> None:
    """Figure 2 for the running agent: the probe step, phase by phase."""
    from controller import Task
    from controller.connect import get_backend
    from scripts.bench.steps import HEAVY_MODULES, STEP_PROBE

    backend = get_backend()
    code = STEP_PROBE.format(heavy=HEAVY_MODULES)
    phases: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    whole_cpu: list[float] = []
    for run in range(probes + 1):
        source = backend.create_task({"name": "source", "project": "bench"})
        Task(source, backend).upload_artifact("out", 1)
        step = backend.create_task({
            "name": "probe", "project": "bench", "script": {"code": code, "entry_point": "probe.py"},
            "hyperparams": {"kwargs": {}, "kwargs_artifacts": {"value": f"{source.id}.out"}},
        })
        backend.enqueue(step.id)
        deadline = time.monotonic() + 120
        while not (record := backend.get_task(step.id)).status.is_terminal:
            if time.monotonic() > deadline:
                raise TimeoutError(f"probe {step.id} did not finish")
            time.sleep(0.005)
        lines = [x.line for x in backend.get_log(step.id) if x.line.startswith('{"first_line"')]
        assert record.status.value == "completed" and lines, (record.status, record.status_message)
        if run == 0:
            continue  # the first one may start the fork server
        last = json.loads(lines[-1])
        phases.setdefault("start (claimed → first line)", []).append(
            (last["first_line"] - record.started_at) * 1000)
        for name, ms in last["phases"].items():
            phases.setdefault(name, []).append(ms)
            cpu.setdefault(name, []).append(last["cpu"][name])
        phases.setdefault("end (last line → finished: exit + report)", []).append(
            (record.finished_at - last["last_line"]) * 1000)
        phases.setdefault("whole (claimed → finished)", []).append(
            (record.finished_at - record.started_at) * 1000)
        whole_cpu.append(last["cpu_at_last_line"])
    print(f"[{label}] one function step run by the agent, phase by phase, wall time:")
    for name, values in phases.items():
        show(f"[{label}]   {name}", values, "ms")
    print(f"[{label}]   CPU time of the step process:")
    for name, values in cpu.items():
        show(f"[{label}]   {name}", values, "ms")
    show(f"[{label}]   step process CPU at its last line (start included)", whole_cpu, "ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="chains per mode")
    parser.add_argument("--chain", type=int, default=20)
    parser.add_argument("--probes", type=int, default=7, help="probe steps per mode (0: skip)")
    parser.add_argument("--samples", type=int, default=20, help="script-step dispatch samples per mode (0: skip)")
    parser.add_argument("--fan", type=int, default=0, help="fan-out/fan-in width (0: skip)")
    parser.add_argument("--http", action="store_true", help="agent and controller over a controller serve process")
    parser.add_argument("--mode", choices=("both", "cold", "warm"), default="both")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="conveyor-bench-pipeline-"))
    os.environ["CONVEYOR_HOME"] = str(home)
    db = f"sqlite:///{home / 'conveyor.db'}"
    server = None
    api = db
    if args.http:
        server, api = start_server(db)
    os.environ["CONVEYOR_API"] = api
    where = "HTTP" if args.http else "embedded SQLite"
    print(f"store: {where}; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs", flush=True)
    modes = {"both": (False, True), "cold": (False,), "warm": (True,)}[args.mode]
    try:
        for warm in modes:
            label = "warm" if warm else "cold"
            with fork_servers(warm), agent_running(home) as agent:
                chain_figures(agent, args.chain, args.runs, label, server.pid if server is not None else None)
                if args.probes:
                    probe_figures(args.probes, label)
                if args.fan:
                    fan_walls, joins = [], []
                    for _ in range(args.runs):
                        wall, lat, _ = run_pipeline("fan", args.fan)
                        fan_walls.append(wall)
                        joins.extend(lat)
                    show(f"[{label}] wall time, fan-out/fan-in of {args.fan} (--concurrency 2)", fan_walls, "s")
                    show(f"[{label}]   fan-in edge latency (last parent → sink running)", joins, "ms")
            if args.samples:
                from scripts.bench.agent import dispatch_latencies

                with fork_servers(warm):
                    latencies = dispatch_latencies(api, home, args.samples)
                show(f"[{label}] dispatch of a script step, enqueue → first line", latencies, "ms")
    finally:
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    main()
