"""Claim atomicity: concurrent claimers in separate processes never share a task."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from controller.backend import Backend
from controller.connect import backend_from_url

TASKS = 200
CLAIMERS = 4


def _claim_until_empty(url: str, worker_id: str, start: Any) -> list[str]:
    """Claim (and complete) tasks until the queue stays empty; return the ids taken."""
    backend = backend_from_url(url)
    start.wait(timeout=60)  # every claimer is connected: start together, for contention
    taken: list[str] = []
    idle_since = None
    while True:
        task = backend.claim(["default"], worker_id, wait_s=0)
        if task is None:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 0.5:
                break
            continue
        idle_since = None
        taken.append(task.id)
        backend.set_status(task.id, "completed", worker_id=worker_id)
    backend.close()
    return taken


def test_concurrent_claimers_take_each_task_exactly_once(backend: Backend, backend_url: str) -> None:
    ids = set()
    for i in range(TASKS):
        task = backend.create_task({"name": f"t{i}"})
        backend.enqueue(task.id)
        ids.add(task.id)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(CLAIMERS) as pool:
        start = manager.Barrier(CLAIMERS)
        results = pool.starmap(
            _claim_until_empty, [(backend_url, f"w{i}", start) for i in range(CLAIMERS)]
        )
    claimed = [task_id for taken in results for task_id in taken]
    assert len(claimed) == len(set(claimed)), "a task was claimed twice"
    assert set(claimed) == ids, "a task was lost"
    assert backend.queue_length("default") == 0
    done = backend.query_tasks(status=["completed"], limit=1000)
    assert len(done) == TASKS
    assert sum(1 for taken in results if taken) >= 2, "claims did not overlap at all"
