"""Benchmarks of the control plane (issue: foundation).

0. The floor of one request with this stack (`requests` client, bare FastAPI route on
   uvicorn: `floor_app.py`): requests/s and CPU per request of client and server.
1. Long-poll wake-up over HTTP: a claimer waits in `claim(wait_s=...)`; another client
   enqueues; time from the enqueue call to the claimer holding the task. p50/p95.
2. Throughput of enqueue + claim + complete cycles per second: direct SQLite, HTTP over
   SQLite, HTTP over PostgreSQL (one client; and several client processes together);
   over HTTP also the CPU time per request of the client and of the server process
   (the primary evidence on a shared machine: wall-clock rates depend on its load, which
   each row prints).
3. Over PostgreSQL, two `controller serve` processes on the same database: the client
   processes split between them (throughput, and its ratio to one server), and the
   long-poll wake-up of a claimer on one server by an enqueue on the other.

Usage: python scripts/bench/store.py [--cycles N] [--runs R] [--wakeups N] [--no-postgres]
Prints a table; with --json, a JSON document too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controller.backend import Backend  # noqa: E402
from controller.connect import backend_from_url  # noqa: E402
from scripts.bench.stats import percentile  # noqa: E402
from tests.helpers_server import free_port, start_server, stop_server  # noqa: E402

POSTGRES_URL = os.environ.get("CONVEYOR_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")



def cycles(url: str, count: int, queue: str = "default", start: Any = None) -> tuple[float, float]:
    """Run `count` enqueue+claim+complete cycles on pre-created tasks.

    Returns (started, ended) wall-clock times of the cycles alone; with `start` (a
    barrier), the cycles begin once every process has made its tasks and waits there
    (so several processes run them together)."""
    backend = backend_from_url(url)
    ids = [backend.create_task({"name": f"bench-{i}"}).id for i in range(count)]
    worker = f"bench-{uuid.uuid4().hex[:6]}"
    if start is not None:
        start.wait()
    started = time.time()
    for task_id in ids:
        backend.enqueue(task_id, queue)
        task = backend.claim([queue], worker)
        backend.set_status(task.id, "completed", worker_id=worker)
    ended = time.time()
    backend.close()
    return started, ended


def cycles_per_s(url: str, count: int) -> float:
    """Cycles per second of one client."""
    started, ended = cycles(url, count)
    return count / (ended - started)


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def cycle_cpu(url: str, server_pid: int, count: int) -> tuple[float, float, float]:
    """One client's cycles against the server process `server_pid`: (cycles/s, client
    CPU ms per request, server CPU ms per request); a cycle is 3 requests."""
    backend = backend_from_url(url)
    ids = [backend.create_task({"name": f"bench-{i}"}).id for i in range(count)]
    worker = f"bench-{uuid.uuid4().hex[:6]}"
    server = psutil.Process(server_pid)
    client_0, server_0, wall_0 = time.process_time(), _cpu_s(server), time.perf_counter()
    for task_id in ids:
        backend.enqueue(task_id, "default")
        task = backend.claim(["default"], worker)
        backend.set_status(task.id, "completed", worker_id=worker)
    wall = time.perf_counter() - wall_0
    client_ms = (time.process_time() - client_0) * 1000 / (3 * count)
    server_ms = (_cpu_s(server) - server_0) * 1000 / (3 * count)
    backend.close()
    return count / wall, client_ms, server_ms


def floor_requests(count: int, runs: int) -> list[tuple[float, float, float]]:
    """(requests/s, client CPU ms, server CPU ms) per run of `count` status-report-like
    POSTs to the bare FastAPI app of `floor_app.py`, with a requests.Session."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("floor_app.py")), str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        session = requests.Session()
        for _ in range(100):
            try:
                session.get(url + "/health", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        server = psutil.Process(proc.pid)
        body = b'{"status": "completed", "worker_id": "w"}'
        headers = {"Content-Type": "application/json"}
        results = []
        for _ in range(runs):
            client_0, server_0, wall_0 = time.process_time(), _cpu_s(server), time.perf_counter()
            for _ in range(count):
                session.post(url + "/tasks/t/status", data=body, headers=headers).raise_for_status()
            wall = time.perf_counter() - wall_0
            results.append((
                count / wall,
                (time.process_time() - client_0) * 1000 / count,
                (_cpu_s(server) - server_0) * 1000 / count,
            ))
        session.close()
        return results
    finally:
        proc.terminate()
        proc.wait(10)


def _cycles_in_process(args: tuple[str, int, str, Any]) -> tuple[float, float]:
    return cycles(*args)


def parallel_cycles(url: str | list[str], count: int, clients: int) -> float:
    """Total cycles/s of `clients` processes running together, each on its own queue.

    With several URLs (servers of one store), client i uses `urls[i % len(urls)]`."""
    urls = [url] if isinstance(url, str) else url
    backend = backend_from_url(urls[0])
    queues = [f"bench-{uuid.uuid4().hex[:6]}" for _ in range(clients)]
    for name in queues:
        backend.create_queue(name)
    backend.close()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(clients) as pool:
        start = manager.Barrier(clients)
        jobs = [(urls[i % len(urls)], count, q, start) for i, q in enumerate(queues)]
        spans = pool.map(_cycles_in_process, jobs, chunksize=1)
    return clients * count / (max(e for _, e in spans) - min(s for s, _ in spans))


def wakeup_latencies(url: str, samples: int, claimer_url: str | None = None) -> list[float]:
    """Seconds from the enqueue call until a long-polling claimer returns the task (the
    claimer on `claimer_url` if given: another server of the same store)."""
    producer: Backend = backend_from_url(url)
    claimer: Backend = backend_from_url(claimer_url or url)
    results: list[float] = []
    for _ in range(samples):
        task = producer.create_task({"name": "wake"})
        got: dict[str, float] = {}
        ready = threading.Event()

        def wait_for_it(task=task, got=got, ready=ready) -> None:  # noqa: ANN001
            ready.set()
            claimed = claimer.claim(["default"], "bench-claimer", wait_s=10)
            got["at"] = time.perf_counter()
            assert claimed is not None and claimed.id == task.id
            claimer.set_status(claimed.id, "completed", worker_id="bench-claimer")

        thread = threading.Thread(target=wait_for_it)
        thread.start()
        ready.wait()
        time.sleep(0.05)  # the claim request is now parked in the server
        sent = time.perf_counter()
        producer.enqueue(task.id)
        thread.join()
        results.append(got["at"] - sent)
    producer.close()
    claimer.close()
    return results


def _pg_schema_url() -> tuple[str, str] | None:
    try:
        import psycopg

        schema = f"bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in POSTGRES_URL else "?"
        return f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}", schema
    except Exception as exc:  # noqa: BLE001
        print(f"PostgreSQL not reachable ({exc}); skipping its rows", file=sys.stderr)
        return None


def _drop_pg_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=1000, help="cycles per run (direct SQLite)")
    parser.add_argument("--http-cycles", type=int, default=300, help="cycles per run over HTTP")
    parser.add_argument("--runs", type=int, default=5, help="runs per configuration")
    parser.add_argument("--wakeups", type=int, default=100, help="long-poll wake-up samples")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL rows")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    runs: dict[str, list[float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))

    def record(name: str, values: list[float], unit: str) -> None:
        results[name] = {
            "unit": unit,  # type: ignore[dict-item]
            "p50": statistics.median(values),
            "p95": percentile(values, 95),
            "min": min(values),
            "max": max(values),
            "n": len(values),
        }
        r = results[name]
        load = os.getloadavg()[0]
        print(
            f"{name:<52} p50 {r['p50']:>9.2f}  p95 {r['p95']:>9.2f}  {unit}  (n={len(values)}, load {load:.1f})",
            flush=True,
        )

    def record_cpu(label: str, samples: list[tuple[float, float, float]], rate_unit: str) -> None:
        record(f"{rate_unit} {label}", [s[0] for s in samples], rate_unit)
        record(f"client CPU ms/request {label}", [s[1] for s in samples], "ms")
        record(f"server CPU ms/request {label}", [s[2] for s in samples], "ms")

    floor = floor_requests(args.http_cycles * 3, args.runs)
    record_cpu("bare FastAPI + requests (floor)", floor, "requests/s")

    sqlite_url = f"sqlite:///{tmp / 'direct.db'}"
    record("cycles/s direct SQLite", [cycles_per_s(sqlite_url, args.cycles) for _ in range(args.runs)], "cycles/s")
    record(
        "cycles/s direct SQLite, 2 processes",
        [parallel_cycles(sqlite_url, args.cycles // 2, 2) for _ in range(args.runs)],
        "cycles/s",
    )

    proc, url = start_server(f"sqlite:///{tmp / 'http.db'}")
    try:
        wake = wakeup_latencies(url, args.wakeups)
        record("long-poll wake-up over HTTP (SQLite)", [w * 1000 for w in wake], "ms")
        record_cpu(
            "HTTP over SQLite", [cycle_cpu(url, proc.pid, args.http_cycles) for _ in range(args.runs)], "cycles/s"
        )
        record(
            "cycles/s HTTP over SQLite, 4 client processes",
            [parallel_cycles(url, args.http_cycles // 2, 4) for _ in range(args.runs)],
            "cycles/s",
        )
    finally:
        stop_server(proc)

    pg = None if args.no_postgres else _pg_schema_url()
    if pg is not None:
        pg_url, schema = pg
        # The durable default, then with synchronous_commit=off (commits do not wait for
        # the WAL fsync: a crash of the database server may lose the last ~0.6 s of
        # changes, never corrupt them). libpq takes it in the URL, as users would set it.
        no_fsync_url = pg_url.replace("options=", "options=-csynchronous_commit%3Doff%20")
        try:
            for label, url_pg in (("", pg_url), (", synchronous_commit=off", no_fsync_url)):
                proc, url = start_server(url_pg)
                proc2, url2 = start_server(url_pg)  # a second server of the same store
                try:
                    wake = wakeup_latencies(url, args.wakeups)
                    record(f"long-poll wake-up over HTTP (PostgreSQL{label})", [w * 1000 for w in wake], "ms")
                    wake = wakeup_latencies(url, args.wakeups, claimer_url=url2)
                    record(f"long-poll wake-up across 2 servers (PostgreSQL{label})", [w * 1000 for w in wake], "ms")
                    record_cpu(
                        f"HTTP over PostgreSQL{label}",
                        [cycle_cpu(url, proc.pid, args.http_cycles) for _ in range(args.runs)],
                        "cycles/s",
                    )
                    for clients in (4, 8):  # a busy server has many agents
                        one = f"cycles/s HTTP over PostgreSQL{label}, {clients} client processes"
                        two = f"{one}, 2 servers"
                        for _ in range(args.runs):  # interleaved: the same machine load for both
                            runs.setdefault(one, []).append(parallel_cycles(url, args.http_cycles // 2, clients))
                            runs.setdefault(two, []).append(
                                parallel_cycles([url, url2], args.http_cycles // 2, clients)
                            )
                        record(one, runs[one], "cycles/s")
                        record(two, runs[two], "cycles/s")
                        record(
                            f"2 servers / 1 server, PostgreSQL{label}, {clients} clients",
                            [b / a for a, b in zip(runs[one], runs[two], strict=True)],
                            "x",
                        )
                finally:
                    stop_server(proc)
                    stop_server(proc2)
                record(
                    f"cycles/s direct PostgreSQL{label}",
                    [cycles_per_s(url_pg, args.http_cycles) for _ in range(args.runs)],
                    "cycles/s",
                )
        finally:
            _drop_pg_schema(schema)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
