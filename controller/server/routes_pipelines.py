"""Pipeline endpoints for the dashboard: runs with their run number, one run's DAG state.

A pipeline run is its controller task (type "controller"): the DAG state the controller
records on `runtime.pipeline` (see `controller.pipeline.controller`), or, before it
started, the definition in `configuration["Pipeline"]` with every step pending.

Decisions:

- **Run number.** The controller names the n-th run of a pipeline "<name> #n" (the
  reference's `add_run_number`), so a name ending in " #n" is run n. A name without the
  suffix is numbered by its place among the runs with exactly that name in the project,
  oldest first (the first run, or pipelines made with `add_run_number=False`).
- **Filters.** `project` filters in the store; `status` (the controller task's status,
  repeatable) filters after numbering, so numbers do not change with the filter. At most
  `MAX_SCANNED_RUNS` runs are looked at per request (newest first).
- **Duration.** finished - started; while the run is active, now - started.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from starlette.responses import Response

import controller
from controller.backend import Backend
from controller.errors import InvalidInputError, NotFoundError
from controller.models import TaskRecord, TaskStatus, TaskType
from controller.server import encode

#: Most controller tasks one listing reads (newest first).
MAX_SCANNED_RUNS = 10_000
#: Default and largest page of the listing.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
TAGS: list[str | Enum] = ["pipelines"]
_RUN_SUFFIX = re.compile(r"^(?P<name>.*\S) #(?P<run>\d+)$")


class PipelineRun(BaseModel):
    """One run of a pipeline (its controller task), summarized for listings."""

    id: str
    name: str = Field(description="the pipeline's name, without the run suffix")
    task_name: str
    project: str
    version: str
    run: int = Field(description="run number of this pipeline name in its project, from 1")
    status: TaskStatus = Field(description="status of the controller task")
    status_reason: str = ""
    status_message: str = ""
    pipeline_status: str = Field("", description="runtime.pipeline.status: '' before it starts")
    queue: str = ""
    worker: str = ""
    tags: list[str] = Field(default_factory=list)
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    step_count: int = 0
    steps: dict[str, int] = Field(default_factory=dict, description="node status → count")


class PipelineRunList(BaseModel):
    """A page of pipeline runs, how many match, and every project that has runs."""

    runs: list[PipelineRun]
    total: int
    projects: list[str] | None = Field(
        description="projects with pipeline runs; null when filtered by project and not asked for"
    )


class PipelineDetail(PipelineRun):
    """One run with its DAG: step name → node state (see `Node.state()`)."""

    parameters: dict[str, Any] = Field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    updated: float | None = Field(None, description="when the controller last recorded the DAG")


class ServerInfo(BaseModel):
    """What the dashboard needs to know about the server."""

    version: str
    files_url: str = Field(description="file:// URL of the files endpoint's folder")
    files_path: str = Field(description="URL path of the files endpoint")
    public_url: str = Field(
        "", description="the server's public address (controller serve --public-url); '' if unset"
    )


def split_run_name(task_name: str) -> tuple[str, int | None]:
    """("pipe", 3) for "pipe #3"; (name, None) for a name without a run suffix."""
    match = _RUN_SUFFIX.match(task_name)
    if match:
        return match["name"], int(match["run"])
    return task_name, None


def run_numbers(records: Iterable[TaskRecord]) -> dict[str, int]:
    """Task id → run number for controller tasks (see the module's decisions)."""
    plain: dict[tuple[str, str], list[TaskRecord]] = defaultdict(list)
    numbers: dict[str, int] = {}
    for rec in records:
        _, run = split_run_name(rec.name)
        if run is not None:
            numbers[rec.id] = run
        else:
            plain[(rec.project, rec.name)].append(rec)
    for same_name in plain.values():
        same_name.sort(key=lambda r: (r.created_at, r.id))
        for i, rec in enumerate(same_name, start=1):
            numbers[rec.id] = i
    return numbers


def _pipeline_state(rec: TaskRecord) -> dict[str, Any]:
    state = getattr(rec.runtime, "pipeline", None)
    return state if isinstance(state, dict) else {}


def _definition(rec: TaskRecord) -> dict[str, Any]:
    definition = rec.configuration.get("Pipeline")
    return definition if isinstance(definition, dict) else {}


def pipeline_nodes(rec: TaskRecord) -> dict[str, dict[str, Any]]:
    """The run's DAG: recorded state, else the definition's steps (all pending)."""
    nodes = _pipeline_state(rec).get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        nodes = _definition(rec).get("steps")
    if not isinstance(nodes, dict):
        return {}
    return {str(k): v for k, v in nodes.items() if isinstance(v, dict)}


def summarize(rec: TaskRecord, run: int, now: float | None = None) -> dict[str, Any]:
    """The `PipelineRun` fields of a controller task."""
    state, definition = _pipeline_state(rec), _definition(rec)
    nodes = pipeline_nodes(rec)
    base_name, _ = split_run_name(rec.name)
    started = rec.started_at
    end = rec.finished_at if rec.status.is_terminal else (now or time.time())
    return {
        "id": rec.id,
        "name": str(state.get("name") or definition.get("name") or base_name),
        "task_name": rec.name,
        "project": rec.project,
        "version": str(state.get("version") or definition.get("version") or ""),
        "run": run,
        "status": rec.status,
        "status_reason": rec.status_reason,
        "status_message": rec.status_message,
        "pipeline_status": str(state.get("status") or ""),
        "queue": rec.execution.queue,
        "worker": rec.runtime.worker,
        "tags": rec.tags,
        "created_at": rec.created_at,
        "started_at": started,
        "finished_at": rec.finished_at,
        "duration_s": max(0.0, end - started) if started is not None and end is not None else None,
        "step_count": len(nodes),
        "steps": dict(Counter(str(n.get("status") or "pending") for n in nodes.values())),
    }


def list_pipeline_runs(
    backend: Backend,
    *,
    project: str | None = None,
    status: list[str] | None = None,
    limit: int = DEFAULT_PAGE,
    offset: int = 0,
    with_projects: bool = True,
) -> PipelineRunList:
    """Pipeline runs, newest first, with run numbers (see the module's decisions).

    The list of projects comes free without a project filter; with one it costs a second
    scan, done only when `with_projects` (the dashboard asks once, for its filter menu).
    """
    if not 0 < limit <= MAX_PAGE:
        raise InvalidInputError(f"limit must be 1..{MAX_PAGE}, got {limit}", field="limit")
    if offset < 0:
        raise InvalidInputError(f"offset must be >= 0, got {offset}", field="offset")
    try:
        wanted = {TaskStatus(s) for s in status or ()}
    except ValueError as exc:
        raise InvalidInputError(f"unknown status: {exc}", field="status") from None
    records = backend.query_tasks(
        project=project or None, type=TaskType.controller.value, limit=MAX_SCANNED_RUNS
    )
    numbers = run_numbers(records)
    matching = [r for r in records if not wanted or r.status in wanted]
    now = time.time()
    runs = [
        PipelineRun(**summarize(r, numbers[r.id], now)) for r in matching[offset : offset + limit]
    ]
    projects: list[str] | None = None
    if not project:
        projects = sorted({r.project for r in records})
    elif with_projects:
        everything = backend.query_tasks(type=TaskType.controller.value, limit=MAX_SCANNED_RUNS)
        projects = sorted({r.project for r in everything})
    return PipelineRunList(runs=runs, total=len(matching), projects=projects)


def pipeline_run(backend: Backend, task_id: str) -> PipelineDetail:
    """One run with its DAG state; NotFoundError unless `task_id` is a controller task."""
    rec = backend.get_task(task_id)
    if rec.type != TaskType.controller:
        raise NotFoundError(
            f"task {task_id!r} is not a pipeline (its type is {rec.type.value!r})", field="task_id"
        )
    _, run = split_run_name(rec.name)
    if run is None:
        same_name = backend.query_tasks(
            project=rec.project, name=rec.name, type=TaskType.controller.value, limit=MAX_SCANNED_RUNS
        )
        run = run_numbers(same_name).get(rec.id, 1)
    state = _pipeline_state(rec)
    parameters = state.get("parameters") or _definition(rec).get("parameters") or {}
    return PipelineDetail(
        **summarize(rec, run),
        parameters=parameters if isinstance(parameters, dict) else {},
        nodes=pipeline_nodes(rec),
        updated=state.get("updated") if isinstance(state.get("updated"), int | float) else None,
    )


def add_pipeline_routes(
    r: APIRouter, prefix: str, backend: Backend, files_url: str, public_url: str = ""
) -> None:
    """Add {prefix}/pipelines, {prefix}/pipelines/{task_id} and {prefix}/info to `r`."""
    P = prefix
    info = ServerInfo(
        version=controller.__version__, files_url=files_url, files_path=P + "/files/",
        public_url=public_url.rstrip("/"),
    ).model_dump_json().encode()

    @r.get(
        P + "/pipelines",
        tags=TAGS,
        response_model=PipelineRunList,
        summary="Pipeline runs (controller tasks) with run numbers, newest first",
    )
    def list_pipelines(
        project: str | None = None,
        status: Annotated[list[str] | None, Query(description="repeat for several")] = None,
        limit: int = DEFAULT_PAGE,
        offset: int = 0,
        with_projects: bool = True,
    ) -> Response:
        found = list_pipeline_runs(
            backend, project=project, status=status, limit=limit, offset=offset,
            with_projects=with_projects,
        )
        return encode.record(found)

    @r.get(
        P + "/pipelines/{task_id}",
        tags=TAGS,
        response_model=PipelineDetail,
        summary="One pipeline run with the state of every step",
    )
    def get_pipeline(task_id: str) -> Response:
        return encode.record(pipeline_run(backend, task_id))

    @r.get(P + "/info", tags=["health"], response_model=ServerInfo, summary="Server facts")
    async def server_info() -> Response:
        return Response(content=info, media_type=encode.JSON)
