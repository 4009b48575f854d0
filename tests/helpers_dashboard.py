"""A real stack for the dashboard's tests: server + agent, a live pipeline, a synthetic DAG.

Also runnable by hand to look at the dashboard with something in it:

    .venv/bin/python -m tests.helpers_dashboard   # prints the URL; Ctrl-C stops everything
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.backend import Backend
from controller.connect import backend_from_url
from controller.models import TaskRecord, TaskStatus
from tests.helpers_server import REPO_ROOT, start_server, stop_server

#: A step that prints its parameters, then `ticks` lines "tick i" every `tick_s` seconds.
STEP_CODE = '''
import json, os, sys, time
from controller.connect import get_backend
backend = get_backend()
task = backend.get_task(os.environ["CONVEYOR_TASK_ID"])
params = task.hyperparams.get("General", {})
print("params", json.dumps(params, sort_keys=True), flush=True)
for i in range(int(params.get("ticks", 0))):
    print("tick", i, flush=True)
    time.sleep(float(params.get("tick_s", 0.1)))
'''

#: The live pipeline: prepare → (features, train) → evaluate → report; train runs long.
PIPELINE_SCRIPT = '''
from controller.automation import PipelineController
pipe = PipelineController(name="live demo", project="{project}", version="1.2.0")
pipe.set_default_execution_queue("default")
pipe.add_parameter("epochs", 3)
base = dict(base_task_project="{project}", base_task_name="step")
pipe.add_step("prepare", **base, parameter_override={{"General/ticks": 3, "General/tick_s": 0.2}})
pipe.add_step("features", parents=["prepare"], **base, parameter_override={{"General/ticks": 4}})
pipe.add_step("train", parents=["prepare"], **base,
              parameter_override={{"General/ticks": 400, "General/tick_s": 0.2,
                                   "General/epochs": "${{pipeline.epochs}}"}})
pipe.add_step("evaluate", parents=["train", "features"], **base)
pipe.add_step("report", parents=["evaluate"], **base)
pipe.start(queue="services")
'''


@dataclass
class Stack:
    """A `controller serve` process with a token and an agent daemon serving it."""

    url: str
    token: str
    home: Path
    backend: Backend
    server: subprocess.Popen
    agent: subprocess.Popen

    def env(self) -> dict[str, str]:
        """Environment of a client of this stack."""
        return {**os.environ, "CONVEYOR_HOME": str(self.home), "CONVEYOR_API": self.url,
                "CONVEYOR_API_TOKEN": self.token,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def start_stack(home: Path, token: str, queues: tuple[str, ...] = ("services", "default")) -> Stack:
    """Start a server (SQLite store under `home`) and an agent on `queues` (4 slots)."""
    home.mkdir(parents=True, exist_ok=True)
    server, url = start_server(f"sqlite:///{home / 'conveyor.db'}", token=token,
                               extra_args=["--files-dir", str(home / "files")])
    backend = backend_from_url(url, token=token)
    stack = Stack(url, token, home, backend, server, None)  # type: ignore[arg-type]
    log = open(home / "agent.log", "wb")  # noqa: SIM115 - closed with the process
    stack.agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", *queues, "--foreground",
         "--concurrency", "4", "--stop-grace", "1"],
        env=stack.env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
    )
    return stack


def stop_stack(stack: Stack) -> None:
    """Stop the agent (SIGTERM; its steps end with it) and the server."""
    if stack.agent.poll() is None:
        stack.agent.terminate()
        try:
            stack.agent.wait(30)
        except subprocess.TimeoutExpired:
            stack.agent.kill()
            stack.agent.wait(10)
    stack.backend.close()
    stop_server(stack.server)


def start_live_pipeline(stack: Stack, project: str, workdir: Path) -> TaskRecord:
    """Register the step template and enqueue the live pipeline on 'services'; returns
    its controller task (queued)."""
    stack.backend.create_task({
        "name": "step", "project": project, "script": {"code": STEP_CODE, "entry_point": "step.py"},
        "hyperparams": {"General": {"ticks": 0, "tick_s": 0.1, "epochs": 1}},
    })
    script = workdir / "live_pipeline.py"
    script.write_text(PIPELINE_SCRIPT.format(project=project))
    subprocess.run([sys.executable, str(script)], env=stack.env(), cwd=workdir, check=True,
                   capture_output=True, timeout=60)
    (controller,) = stack.backend.query_tasks(project=project, type="controller")
    return controller


def synthetic_pipeline(backend: Backend, project: str, steps: int = 200, seed: int = 7) -> TaskRecord:
    """A running pipeline task whose `runtime.pipeline` has `steps` nodes in ~14 layers
    (1-3 parents each, every status), made directly through the Backend."""
    rng = random.Random(seed)
    base = backend.create_task({
        "name": "synthetic step", "project": project,
        "hyperparams": {"General": {"lr": 0.1, "epochs": 10, "batch": 32}},
    })
    layers: list[list[str]] = []
    per_layer = max(1, steps // 14)
    nodes: dict[str, dict[str, Any]] = {}
    now = time.time()
    statuses = ["completed"] * 5 + ["cached", "skipped", "failed", "aborted", "running", "queued", "pending"]
    for i in range(steps):
        layer = min(i // per_layer, 13)
        if layer == len(layers):
            layers.append([])
        name = f"step_{i:03d}"
        parents = rng.sample(layers[layer - 1], k=min(len(layers[layer - 1]), rng.randint(1, 3))) if layer else []
        layers[layer].append(name)
        status = rng.choice(statuses)
        started = now - 600 + layer * 30 if status not in ("pending", "queued") else None
        nodes[name] = {
            "name": name, "status": status, "status_message": f"{status} (synthetic)",
            "task_id": None, "base_task_id": base.id, "parents": parents, "queue": "default",
            "parameters": {"General/lr": "${pipeline.lr}"},
            "resolved_parameters": {"General/lr": 0.01 * (i % 7 + 1), "General/epochs": 10},
            "overrides": {}, "retries": 0, "started": started,
            "ended": started + 20 if started and status not in ("running",) else None,
            "worker": "synthetic:0" if started else "", "kind": "task", "cache": False,
        }
    return pipeline_with_nodes(backend, project, nodes)


def pipeline_with_nodes(backend: Backend, project: str, nodes: dict[str, dict[str, Any]]) -> TaskRecord:
    """A running pipeline task (controller task "synthetic") whose DAG state is `nodes`."""
    task = backend.create_task({
        "name": "synthetic", "project": project, "type": "controller", "tags": ["pipeline"],
        "configuration": {"Pipeline": {"name": "synthetic", "version": "2.0.0", "steps": {}}},
        "hyperparams": {"Pipeline": {"lr": 0.01}},
    })
    backend.set_status(task.id, TaskStatus.in_progress, reason="started", message="synthetic")
    set_nodes(backend, task.id, nodes)
    return backend.get_task(task.id)


def node_state(name: str, parents: list[str], status: str, started: float | None = None,
               ended: float | None = None) -> dict[str, Any]:
    """One step's recorded state (as `Node.state()` writes it) without a task."""
    return {
        "name": name, "status": status, "status_message": "", "task_id": None, "base_task_id": None,
        "parents": parents, "queue": "default", "parameters": {}, "resolved_parameters": {}, "overrides": {},
        "retries": 0, "started": started, "ended": ended, "worker": "", "kind": "task", "cache": False,
    }


def set_nodes(backend: Backend, task_id: str, nodes: dict[str, dict[str, Any]]) -> None:
    """Record `nodes` as the pipeline state of a controller task."""
    backend.edit_task(task_id, {"runtime": {"pipeline": {
        "name": "synthetic", "version": "2.0.0", "status": "running", "started": time.time() - 600,
        "updated": time.time(), "nodes": nodes, "parameters": {"lr": 0.01},
    }}}, force=True)


def _main() -> None:
    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a background job ignores SIGINT: clean up on TERM too
    home = Path(tempfile.mkdtemp(prefix="conveyor-dash-"))
    stack = start_stack(home / "home", "dev-token")
    try:
        synthetic_pipeline(stack.backend, "synthetic")
        controller = start_live_pipeline(stack, "demo", home)
        print(f"{stack.url}/?token={stack.token}  (live pipeline {controller.id})", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_stack(stack)


if __name__ == "__main__":
    _main()
