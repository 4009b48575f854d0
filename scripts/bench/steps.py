"""Where the milliseconds of a trivial function step go (issue 17).

Every figure is taken in fresh processes run by the interpreter of a step's venv (built
with `agent.environments.venv.ensure_venv`, as the agent builds it: the SDK comes through
the venv's .pth file), with the step's environment (`CONVEYOR_API`, `CONVEYOR_HOME`,
`CONVEYOR_TASK_ID`). p50/p95 over `--runs` runs.

1. Interpreter start: `python -c pass` in the step venv (the floor).
2. Imports: `import controller.sdk` and `import controller.pipeline.function_runner` (what a
   generated function step imports), each timed inside a fresh process, plus the heavy
   libraries they load (pydantic, SQLAlchemy, the pipeline engine, requests...) and the
   slowest modules by `python -X importtime` (one run).
3. One step, phase by phase (a probe script doing what `run_function_step` does, with a
   clock between the phases): start (spawn → first line), import (the function runner),
   store open (`get_backend()`), init (`Task.init()`: the task record), inputs (the
   parent's artifact: `Task.get_task` + `.get()`), function, outputs (`upload_artifact`),
   report (one `Logger.report_scalar`), exit (last line → process gone: atexit flushes,
   threads, interpreter teardown).
4. The real generated step (`run_function_step`, as the agent runs it) start to exit.
5. The 20-step chain wall time on one agent (`scripts/bench/pipeline.py`'s `run_pipeline`).

Usage: python scripts/bench/steps.py [--runs R] [--chain N] [--chain-runs R] [--http]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.environments.venv import ensure_venv  # noqa: E402
from scripts.bench.pipeline import run_pipeline, start_agent  # noqa: E402
from scripts.bench.stats import show  # noqa: E402
from scripts.bench.trivial_steps import noop  # noqa: E402
from tests.helpers_server import start_server, stop_server  # noqa: E402

#: Modules whose presence after an import says what the step paid for.
HEAVY_MODULES = (
    "pydantic", "sqlalchemy", "psycopg", "requests", "urllib3", "fsspec",
    "controller.models", "controller.store", "controller.client",
    "controller.pipeline.controller", "controller.pipeline.runner", "controller.sdk.script_info",
)

IMPORT_PROBE = """\
import sys, time, json
started, started_cpu = time.perf_counter(), time.process_time()
import {module}
elapsed_ms = (time.perf_counter() - started) * 1000
cpu_ms = (time.process_time() - started_cpu) * 1000
heavy = {heavy!r}
print(json.dumps({{"ms": elapsed_ms, "cpu_ms": cpu_ms, "loaded": [m for m in heavy if m in sys.modules],
                   "modules": len(sys.modules)}}))
"""

# What `run_function_step` does, with a clock between the phases.
STEP_PROBE = """\
import time
first_line = time.time()
import json, sys
phases, cpu = {{}}, {{}}
mark, mark_cpu = time.perf_counter(), time.process_time()

def phase(name):
    global mark, mark_cpu
    now, now_cpu = time.perf_counter(), time.process_time()
    phases[name], cpu[name] = (now - mark) * 1000, (now_cpu - mark_cpu) * 1000
    mark, mark_cpu = now, now_cpu

from controller.pipeline.function_runner import run_function_step  # what a step imports
phase("import")
loaded_after_import = [m for m in {heavy!r} if m in sys.modules]
from controller.connect import get_backend
from controller import Logger, Task
get_backend()
phase("store open")
task = Task.init()
record = task.data
phase("init")
source_id, _, name = record.hyperparams["kwargs_artifacts"]["value"].partition(".")
value = Task.get_task(task_id=source_id).artifacts[name].get()
phase("inputs")
result = value + 1
phase("function")
task.upload_artifact("out", result)
phase("outputs")
Logger.current_logger().report_scalar("bench", "value", result, 0)
phase("report")
print(json.dumps({{"first_line": first_line, "phases": phases, "cpu": cpu, "loaded": loaded_after_import,
                   "loaded_at_end": [m for m in {heavy!r} if m in sys.modules],
                   "cpu_at_last_line": time.process_time() * 1000, "last_line": time.time()}}), flush=True)
"""


@dataclass
class Child:
    """A finished child process: its output, wall-clock spawn and exit times (time.time),
    and the CPU time (user + system) it used, in ms."""

    stdout: str
    spawned: float
    exited: float
    cpu_ms: float


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(python: Path, args: list[str], env: dict[str, str], cwd: Path) -> Child:
    """Run a process to its end (one at a time, so the children's CPU time is its own)."""
    cpu_before = _children_cpu_s()
    spawned = time.time()
    proc = subprocess.run([str(python), *args], env=env, cwd=cwd, capture_output=True, text=True)
    exited = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)[:80]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return Child(proc.stdout, spawned, exited, (_children_cpu_s() - cpu_before) * 1000)


def step_environment(api: str, home: Path, venv: Path, task_id: str) -> dict[str, str]:
    """The environment the agent gives a step (see agent.executor.build_env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(CONVEYOR_HOME=str(home), CONVEYOR_API=api, CONVEYOR_TASK_ID=task_id,
               CONVEYOR_WORKER_ID="bench", PYTHONUNBUFFERED="1", VIRTUAL_ENV=str(venv))
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)  # the step sees the SDK through the venv's .pth only
    return env


def make_step_task(api: str, step_code: str) -> str:
    """A parent task with artifact "out" = 1 and an in_progress step task reading it."""
    from controller import Task
    from controller.connect import backend_from_url

    backend = backend_from_url(api)
    source = backend.create_task({"name": "source", "project": "bench"})
    Task(source, backend).upload_artifact("out", 1)
    step = backend.create_task({
        "name": "step", "project": "bench",
        "script": {"code": step_code, "entry_point": "step.py"},
        "hyperparams": {"kwargs": {}, "kwargs_artifacts": {"value": f"{source.id}.out"}},
    })
    backend.enqueue(step.id)
    claimed = backend.claim(["default"], "bench")
    assert claimed is not None and claimed.id == step.id, claimed
    return step.id


def import_times(python: Path, env: dict[str, str], cwd: Path, runs: int) -> None:
    """Figures 1 and 2."""
    bare, bare_cpu = [], []
    for _ in range(runs):
        child = run_child(python, ["-c", "pass"], env, cwd)
        bare.append((child.exited - child.spawned) * 1000)
        bare_cpu.append(child.cpu_ms)
    show("interpreter start: python -c pass (step venv)", bare, "ms")
    show("  CPU", bare_cpu, "ms")
    for module in ("controller.sdk", "controller.pipeline.function_runner"):
        times, cpu, last = [], [], {}
        for _ in range(runs):
            child = run_child(python, ["-c", IMPORT_PROBE.format(module=module, heavy=HEAVY_MODULES)], env, cwd)
            last = json.loads(child.stdout)
            times.append(last["ms"])
            cpu.append(last["cpu_ms"])
        show(f"import {module}", times, "ms")
        show("  CPU", cpu, "ms")
        print(f"    {last['modules']} modules; heavy ones loaded: {', '.join(last['loaded']) or 'none'}")
    proc = subprocess.run([str(python), "-X", "importtime", "-c", "import controller.pipeline.function_runner"],
                          env=env, cwd=cwd, capture_output=True, text=True, check=True)
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), int(parts[0].split(":")[1]), parts[2].rstrip()))
    print("    slowest imports of the function runner (cumulative / self, µs, -X importtime):")
    for cumulative, own, name in sorted(rows, reverse=True)[:12]:
        print(f"      {cumulative:>8} {own:>8}  {name}")


def step_phases(python: Path, api: str, home: Path, venv: Path, work: Path, runs: int) -> None:
    """Figures 3 and 4."""
    probe = work / "probe.py"
    probe.write_text(STEP_PROBE.format(heavy=HEAVY_MODULES))
    from controller.pipeline.function_step import build_function_spec

    spec = build_function_spec("s", noop, {"value": 0}, ["out"], None, [])
    real_step = work / "step.py"
    real_step.write_text(spec["task_spec"]["script"]["code"])
    phases: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    totals, total_cpu, real_totals, real_cpu = [], [], [], []
    last: dict = {}
    for _ in range(runs):
        env = step_environment(api, home, venv, make_step_task(api, probe.read_text()))
        child = run_child(python, [str(probe)], env, work)
        last = json.loads(child.stdout.strip().splitlines()[-1])
        phases.setdefault("start (spawn → first line)", []).append((last["first_line"] - child.spawned) * 1000)
        for name, ms in last["phases"].items():
            phases.setdefault(name, []).append(ms)
            cpu.setdefault(name, []).append(last["cpu"][name])
        phases.setdefault("exit (last line → process gone)", []).append((child.exited - last["last_line"]) * 1000)
        cpu.setdefault("start + exit (interpreter, atexit, teardown)", []).append(
            child.cpu_ms - sum(last["cpu"].values()))
        totals.append((child.exited - child.spawned) * 1000)
        total_cpu.append(child.cpu_ms)
        env = step_environment(api, home, venv, make_step_task(api, real_step.read_text()))
        child = run_child(python, [str(real_step)], env, work)
        real_totals.append((child.exited - child.spawned) * 1000)
        real_cpu.append(child.cpu_ms)
    where = "HTTP" if api.startswith("http") else "embedded SQLite"
    print(f"one function step, phase by phase ({where}), wall time:")
    for name, values in phases.items():
        show(f"  {name}", values, "ms")
    show("  whole probe process", totals, "ms")
    print("  the same, CPU time (user + system; steadier than wall time on a loaded machine):")
    for name, values in cpu.items():
        show(f"  {name}", values, "ms")
    show("  whole probe process", total_cpu, "ms")
    print(f"    heavy modules after the import: {', '.join(last['loaded']) or 'none'}")
    print(f"    heavy modules at the end: {', '.join(last['loaded_at_end']) or 'none'}")
    show(f"real generated step (run_function_step), {where}", real_totals, "ms")
    show("  CPU", real_cpu, "ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="runs of each per-process figure")
    parser.add_argument("--chain", type=int, default=20, help="steps in the chain (0: skip the chain)")
    parser.add_argument("--chain-runs", type=int, default=3)
    parser.add_argument("--http", action="store_true", help="steps talk to a controller serve process")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-steps-"))
    home = work / "home"
    home.mkdir()
    os.environ["CONVEYOR_HOME"] = str(home)
    db = f"sqlite:///{home / 'conveyor.db'}"
    server = None
    api = db
    if args.http:
        server, api = start_server(db)
    os.environ["CONVEYOR_API"] = api
    try:
        venv = ensure_venv(sys.executable, [], None, home / "cache", lambda _line: None)
        env = step_environment(api, home, venv.path, "none")
        import_times(venv.python_path, env, work, args.runs)
        step_phases(venv.python_path, api, home, venv.path, work, args.runs)
        venv.release()
        if args.chain:
            agent = start_agent(home)
            try:
                run_pipeline("chain", 2)  # warm up: the steps' venv
                walls, edges = [], []
                for _ in range(args.chain_runs):
                    wall, latencies, _ = run_pipeline("chain", args.chain)
                    walls.append(wall)
                    edges.extend(latencies)
                show(f"wall time, chain of {args.chain} function steps", walls, "s")
                show("  per step (wall / steps)", [w / args.chain * 1000 for w in walls], "ms")
                show("  DAG edge (parent finished → child started)", edges, "ms")
            finally:
                agent.terminate()
                agent.wait(60)
    finally:
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    main()
