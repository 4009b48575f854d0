"""Exactly-once delivery under contention (issue: control plane, one path per operation).

4 agents' worth of claimers (separate processes) take 400 tasks each from one queue, on
SQLite, PostgreSQL and HTTP over each: every task must be claimed exactly once (0
duplicated, 0 lost). Prints one line per transport with the counts and the wall time.

Usage: python scripts/bench/exactly_once.py [--agents 4] [--tasks-per-agent 400] [--no-postgres]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controller.connect import backend_from_url  # noqa: E402
from scripts.bench.store import _drop_pg_schema, _pg_schema_url  # noqa: E402
from tests.helpers_server import start_server, stop_server  # noqa: E402

#: Seconds a claimer waits on an empty queue before it decides the work is done.
IDLE_END_S = 1.0


def claim_until_empty(url: str, worker_id: str, start: Any) -> list[str]:
    """Claim (long-polling) and complete tasks until the queue stays empty; the ids taken."""
    backend = backend_from_url(url)
    start.wait(timeout=120)
    taken: list[str] = []
    while True:
        task = backend.claim(["default"], worker_id, wait_s=IDLE_END_S)
        if task is None:
            break
        taken.append(task.id)
        backend.set_status(task.id, "completed", worker_id=worker_id)
    backend.close()
    return taken


def run(url: str, agents: int, tasks_per_agent: int) -> tuple[int, int, int, float]:
    """(tasks, duplicated, lost, seconds) for one transport."""
    backend = backend_from_url(url)
    ids = set()
    for i in range(agents * tasks_per_agent):
        task = backend.create_task({"name": f"once-{i}"})
        backend.enqueue(task.id)
        ids.add(task.id)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(agents) as pool:
        start = manager.Barrier(agents)
        began = time.monotonic()
        results = pool.starmap(claim_until_empty, [(url, f"agent-{i}", start) for i in range(agents)])
        seconds = time.monotonic() - began - IDLE_END_S
    claimed = [task_id for taken in results for task_id in taken]
    duplicated = len(claimed) - len(set(claimed))
    lost = len(ids - set(claimed))
    completed = len(backend.query_tasks(status=["completed"], limit=len(ids) + 1))
    backend.close()
    assert completed == len(ids) - lost, f"{completed} completed of {len(ids)}"
    return len(ids), duplicated, lost, seconds


def main() -> None:
    """Run every transport and print the counts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--tasks-per-agent", type=int, default=400)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"SQLite": f"sqlite:///{tmp}/once.db"}
        schemas = []
        if not args.no_postgres and (pg := _pg_schema_url()) is not None:
            urls["PostgreSQL"], schema = pg
            schemas.append(schema)
        servers = []
        for name, url in list(urls.items()):
            if name == "SQLite":
                url = f"sqlite:///{tmp}/once-http.db"
            elif (pg := _pg_schema_url()) is not None:
                url, schema = pg
                schemas.append(schema)
            proc, base_url = start_server(url)
            servers.append(proc)
            urls[f"HTTP over {name}"] = base_url
        try:
            for name, url in urls.items():
                tasks, duplicated, lost, seconds = run(url, args.agents, args.tasks_per_agent)
                print(f"exactly once, {args.agents} agents, {name:<22} {tasks} tasks  "
                      f"duplicated {duplicated}  lost {lost}  ({seconds:.1f} s)", flush=True)
        finally:
            for proc in servers:
                stop_server(proc)
            for schema in schemas:
                _drop_pg_schema(schema)


if __name__ == "__main__":
    main()
