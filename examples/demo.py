"""`make demo`: the reference example pipeline, run by real agents on the embedded store.

1. makes a throw-away CONVEYOR_HOME (the embedded SQLite store lives there);
2. starts `agent daemon --queue services default` in the background;
3. registers the three step templates (examples/steps/*.py) as draft tasks;
4. runs examples/pipeline_from_tasks.py, which sends the pipeline to "services": the
   agent runs the controller, the controller sends the steps to "default";
5. follows the pipeline, prints its DAG with step statuses and the final accuracy,
   stops the agent and removes the throw-away CONVEYOR_HOME (kept, and its path
   printed, with `CONVEYOR_DEMO_KEEP=1` or `--keep`, or when the demo failed).

The steps' virtualenv gets scikit-learn from PyPI. Its downloads go to uv's own cache
(`uv cache dir`, shared across runs, so only the first run downloads) unless
UV_CACHE_DIR is set; the demo's folder then holds hard links, not copies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    ("step1_dataset_artifact.py", "pipeline step 1 dataset artifact"),
    ("step2_process_dataset.py", "pipeline step 2 process dataset"),
    ("step3_train_model.py", "pipeline step 3 train model"),
]
TIMEOUT_S = 900


def main(argv: list[str]) -> int:
    """Run the demo; 0 if the pipeline completed and reported its accuracy."""
    keep = "--keep" in argv or os.environ.get("CONVEYOR_DEMO_KEEP", "") not in ("", "0")
    home = Path(tempfile.mkdtemp(prefix="conveyor-demo-"))
    os.environ["CONVEYOR_HOME"] = str(home)
    os.environ.pop("CONVEYOR_API", None)
    use_uv_cache()
    ok = False
    try:
        ok = run_demo(home)
    finally:
        if keep or not ok:
            why = "as asked" if keep else "the demo failed"
            print(f"store, logs and caches kept in {home} ({why}; remove it when done)")
        else:
            shutil.rmtree(home, ignore_errors=True)
            print(f"removed {home} (run with CONVEYOR_DEMO_KEEP=1 or --keep to look around in it)")
    return 0 if ok else 1


def use_uv_cache() -> None:
    """Point the agent's installs at uv's own cache, so later demos download nothing."""
    if os.environ.get("UV_CACHE_DIR"):
        return
    from agent.environments.venv import find_uv

    uv = find_uv()
    if uv is None:
        return
    found = subprocess.run([uv, "cache", "dir"], capture_output=True, text=True, check=False)
    if found.returncode == 0 and found.stdout.strip():
        os.environ["UV_CACHE_DIR"] = found.stdout.strip()
        print(f"package downloads cached in {os.environ['UV_CACHE_DIR']} (uv's cache)")


def run_demo(home: Path) -> bool:
    """Start an agent in `home`, run the pipeline on it, print what happened."""
    from controller import Task
    from controller.connect import get_backend

    backend = get_backend()
    print(f"embedded store: {backend.url}")
    agent_log = home / "agent.log"
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "services", "default",
         "--concurrency", "3", "--foreground"],
        env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=open(agent_log, "wb"),  # noqa: SIM115
        cwd=ROOT,
    )
    print(f"agent started (pid {agent.pid}) on queues services, default; log: {agent_log}")
    ok = False
    try:
        for script, name in STEPS:
            template = Task.create(project_name="examples", task_name=name,
                                   script=str(ROOT / "examples" / "steps" / script),
                                   packages=["scikit-learn"], force_single_script_file=True)
            print(f"registered template {name!r} ({template.id})")
        subprocess.run([sys.executable, str(ROOT / "examples" / "pipeline_from_tasks.py")],
                       check=True, env=os.environ.copy(), cwd=ROOT)
        pipeline = backend.query_tasks(project="examples", type="controller", limit=1)[0]
        ok = follow(backend, pipeline.id)
    finally:
        agent.terminate()
        agent.wait(120)
        print("agent stopped")
    return ok


def follow(backend, pipeline_id: str) -> bool:  # noqa: ANN001
    """Print step status changes until the pipeline ends; then the DAG and the metric."""
    seen: dict[str, str] = {}
    started = time.monotonic()
    record = backend.get_task(pipeline_id)
    while not record.status.is_terminal:
        if time.monotonic() - started > TIMEOUT_S:
            print(f"the pipeline did not finish in {TIMEOUT_S} s")
            return False
        nodes = (record.runtime.model_dump().get("pipeline") or {}).get("nodes", {})
        for name, node in nodes.items():
            if seen.get(name) != node["status"]:
                seen[name] = node["status"]
                print(f"  [{time.monotonic() - started:6.1f} s] {name}: {node['status']}")
        time.sleep(0.2)
        record = backend.get_task(pipeline_id)
    nodes = (record.runtime.model_dump().get("pipeline") or {}).get("nodes", {})
    print(f"\npipeline {record.name!r}: {record.status.value} ({record.status_message})")
    print(f"{'step':<15} {'status':<10} {'parents':<15} {'seconds':>8}  task")
    for name, node in nodes.items():
        took = (node["ended"] or 0) - (node["started"] or node["ended"] or 0)
        print(f"{name:<15} {node['status']:<10} {','.join(node['parents']) or '-':<15} {took:>8.2f}  {node['task_id']}")
    accuracy = [s.value for s in backend.get_scalars(pipeline_id, title="model", series="accuracy")]
    if accuracy:
        print(f"\nfinal metric: test accuracy {accuracy[-1]:.3f}")
    else:
        print("\nno accuracy was reported; step logs:")
        for name, node in nodes.items():
            if node["task_id"]:
                print(f"--- {name}")
                for line in backend.get_log(node["task_id"], tail=15):
                    print(f"   {line.line}")
    return record.status.value == "completed" and bool(accuracy)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
