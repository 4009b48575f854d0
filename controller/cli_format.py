"""Output of the `controller` command line: tables, times, task details, JSON.

The `format_*` functions return strings; the `echo_*` functions print. Times are seconds since the epoch (UTC)
and are shown in local time ("2026-11-22 10:03:01") or relative to now ("12s ago").
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import click
from pydantic import BaseModel

from controller.models import LogLine, TaskRecord

#: Key of a pipeline's run state in `runtime`.
PIPELINE_KEY = "pipeline"
#: Key of a pipeline's definition in `configuration`.
PIPELINE_DEFINITION_KEY = "Pipeline"
#: Widest a table cell may be before it is cut with "…".
MAX_CELL_CHARS = 48
#: Lines of a long text field (code, diff, setup script) `tasks show` prints.
MAX_TEXT_LINES = 20
ELLIPSIS = "…"
NONE = "-"


def truncate(text: str, width: int = MAX_CELL_CHARS) -> str:
    """`text` on one line, cut to `width` characters with a trailing "…"."""
    text = " ".join(str(text).split())
    if width > 0 and len(text) > width:
        return text[: max(width - 1, 0)] + ELLIPSIS
    return text


def format_time(ts: float | None) -> str:
    """A timestamp as local "YYYY-MM-DD HH:MM:SS", or "-" for none."""
    if ts is None:
        return NONE
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def format_duration(seconds: float) -> str:
    """A length of time, coarse and short: "0.4s", "12s", "3m 05s", "2h 10m", "4d 3h"."""
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f}s".replace(".0s", "s")
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def format_age(ts: float | None, now: float | None = None) -> str:
    """How long ago `ts` was: "12s ago", "3m ago", "2h ago", "5d ago" ("in 20s" if ahead)."""
    if ts is None:
        return NONE
    delta = (time.time() if now is None else now) - ts
    ahead = delta < 0
    s = int(abs(delta))
    if s < 60:
        text = f"{s}s"
    elif s < 3600:
        text = f"{s // 60}m"
    elif s < 86400:
        text = f"{s // 3600}h"
    else:
        text = f"{s // 86400}d"
    return f"in {text}" if ahead else f"{text} ago"


def format_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    right: Iterable[int] = (),
    max_width: int = MAX_CELL_CHARS,
) -> str:
    """Fixed-width columns sized to their content; cells longer than `max_width` are cut.

    Columns whose index is in `right` are right-aligned (numbers). The last column is not
    padded, so lines carry no trailing blanks.
    """
    right_cols = set(right)
    cells = [[truncate("" if c is None else str(c), max_width) for c in row] for row in rows]
    table = [list(headers), *cells]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = []
    for row in table:
        parts = []
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            if i in right_cols:
                parts.append(cell.rjust(widths[i]))
            else:
                parts.append(cell if last else cell.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------ task details


def _value(value: Any) -> str:
    """A field value on one line: strings as is, everything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, sort_keys=True)


def _fields(pairs: Sequence[tuple[str, Any]], indent: str = "  ") -> list[str]:
    """Aligned "key: value" lines; multi-line text is indented under its key and cut."""
    shown = [(k, v) for k, v in pairs if v not in (None, "", [], {})]
    if not shown:
        return [f"{indent}(none)"]
    width = max(len(k) for k, _ in shown) + 1
    lines = []
    for key, value in shown:
        text = _value(value)
        if "\n" not in text:
            lines.append(f"{indent}{(key + ':').ljust(width)} {text}")
            continue
        body = text.rstrip("\n").splitlines()
        lines.append(f"{indent}{key}: ({len(body)} lines)")
        lines.extend(f"{indent}  | {line}" for line in body[:MAX_TEXT_LINES])
        if len(body) > MAX_TEXT_LINES:
            lines.append(
                f"{indent}  | {ELLIPSIS} {len(body) - MAX_TEXT_LINES} more lines (see --json)"
            )
    return lines


def _section(title: str, lines: list[str]) -> list[str]:
    return ["", title, *lines]


def _run_time(task: TaskRecord, now: float) -> str:
    if task.started_at is None:
        return ""
    end = task.finished_at if task.finished_at is not None else now
    suffix = "" if task.finished_at is not None else " (running)"
    return format_duration(end - task.started_at) + suffix


def format_task(task: TaskRecord, now: float | None = None) -> str:
    """Every section of a task record, human readable (`controller tasks show`)."""
    now = time.time() if now is None else now
    status = task.status.value + (f" ({task.status_reason})" if task.status_reason else "")
    out = [f"Task {task.id}  {task.name}"]
    out += _fields(
        [
            ("project", task.project),
            ("type", task.type.value),
            ("status", status),
            ("message", task.status_message),
            ("tags", ", ".join(task.tags)),
            ("parent", task.parent),
            ("comment", task.comment),
        ]
    )
    out += _section("Script", _fields(list(task.script.model_dump().items())))
    out += _section("Packages", [f"  {p}" for p in task.packages] or ["  (none)"])
    out += _section("Container", _fields(list(task.container.model_dump().items())))

    hp_lines = [
        f"  {section}/{key} = {_value(value)}"
        for section, params in sorted(task.hyperparams.items())
        for key, value in sorted(params.items())
    ]
    out += _section("Hyperparameters", hp_lines or ["  (none)"])
    configuration = dict(task.configuration)
    definition = configuration.get(PIPELINE_DEFINITION_KEY)
    if isinstance(definition, dict) and isinstance(definition.get("steps"), dict):
        steps = definition["steps"]  # shown as the Pipeline table
        configuration[PIPELINE_DEFINITION_KEY] = f"(the pipeline's definition, {len(steps)} steps: see --json)"
    out += _section("Configuration", _fields(sorted(configuration.items())))

    execution = task.execution
    limit = format_duration(execution.time_limit_s) if execution.time_limit_s else ""
    out += _section(
        "Execution",
        _fields(
            [
                ("queue", execution.queue),
                ("priority", str(execution.priority)),
                ("time limit", limit),
            ]
        ),
    )
    runtime = task.runtime.model_dump()
    if isinstance(runtime.get(PIPELINE_KEY), dict):  # shown as the Pipeline table
        runtime.pop(PIPELINE_KEY)
    if runtime.get("exit_code") is not None:
        runtime["exit_code"] = str(runtime["exit_code"])
    runtime["attempt"] = str(runtime["attempt"]) if runtime.get("attempt") else ""
    out += _section("Runtime", _fields(list(runtime.items())))

    art_lines = []
    for name, art in sorted(task.artifacts.items()):
        extra = ", ".join(
            x for x in (art.type, f"{art.size} bytes" if art.size is not None else "") if x
        )
        art_lines.append(f"  {name}: {art.uri}" + (f" ({extra})" if extra else ""))
    out += _section("Artifacts", art_lines or ["  (none)"])

    model_lines = [
        f"  {direction}: {m.name or NONE} {m.url}".rstrip()
        + (f" [{m.framework}]" if m.framework else "")
        for direction, models in sorted(task.models.items())
        for m in models
    ]
    out += _section("Models", model_lines or ["  (none)"])

    out += _section(
        "Timestamps",
        _fields(
            [
                ("created", format_time(task.created_at)),
                ("updated", format_time(task.updated_at)),
                ("queued", task.queued_at and format_time(task.queued_at)),
                ("started", task.started_at and format_time(task.started_at)),
                ("finished", task.finished_at and format_time(task.finished_at)),
                ("run time", _run_time(task, now)),
                (
                    "lease expires",
                    task.lease_expires_at and format_age(task.lease_expires_at, now),
                ),
            ]
        ),
    )
    history = [
        (format_time(c.time), c.status.value, c.reason, c.message) for c in task.status_history
    ]
    hist_lines = (
        [
            "  " + line
            for line in format_table(
                ["TIME", "STATUS", "REASON", "MESSAGE"], history, max_width=80
            ).splitlines()
        ]
        if history
        else ["  (none)"]
    )
    out += _section("Status history", hist_lines)
    return "\n".join(out)


def pipeline_run_state(task: TaskRecord) -> dict[str, Any] | None:
    """The run state a pipeline controller records on its task (`runtime.pipeline`), if any."""
    state = (task.runtime.model_extra or {}).get(PIPELINE_KEY)
    return state if isinstance(state, dict) and isinstance(state.get("nodes"), dict) else None


def _step_duration(node: dict[str, Any], now: float) -> str:
    started, ended = node.get("started"), node.get("ended")
    if not isinstance(started, int | float):
        return NONE
    if isinstance(ended, int | float):
        return format_duration(ended - started)
    return format_duration(now - started) + " (running)"


def format_pipeline(task: TaskRecord, now: float | None = None) -> str:
    """A pipeline's steps as a table (step, status, task id, parents, duration), with the
    pipeline's status and when it last changed; "" for a task that is not a pipeline."""
    state = pipeline_run_state(task)
    if state is None:
        return ""
    now = time.time() if now is None else now
    rows = [
        [
            name,
            str(node.get("status") or NONE),
            node.get("task_id") or NONE,
            ", ".join(node.get("parents") or []) or NONE,
            _step_duration(node, now),
        ]
        for name, node in state["nodes"].items()
        if isinstance(node, dict)
    ]
    title = f"Pipeline {state.get('name') or task.name}"
    if state.get("version"):
        title += f" v{state['version']}"
    title += f": {state.get('status') or NONE}"
    if isinstance(state.get("updated"), int | float):
        title += f" (updated {format_age(state['updated'], now)})"
    table = (
        format_table(["STEP", "STATUS", "TASK", "PARENTS", "DURATION"], rows)
        if rows
        else "(no steps)"
    )
    return "\n".join(_section(title, ["  " + line for line in table.splitlines()]))


# ------------------------------------------------------------------------- printing


def echo_json(data: BaseModel | Iterable[BaseModel]) -> None:
    """Print one record or a list of records as indented JSON."""
    if isinstance(data, BaseModel):
        payload: Any = data.model_dump(mode="json")
    else:
        payload = [item.model_dump(mode="json") for item in data]
    click.echo(json.dumps(payload, indent=2))


def echo_table(headers: list[str], rows: list[list[Any]], empty: str, **kw: Any) -> None:
    """Print a table, or `empty` when there are no rows."""
    click.echo(format_table(headers, rows, **kw) if rows else empty)


def next_offset(lines: list[LogLine], offset: int) -> int:
    """The log offset after `lines`, which were read from `offset`."""
    if not lines:
        return offset
    last = lines[-1].n
    return last + 1 if last is not None else offset + len(lines)


def echo_log(lines: list[LogLine], as_json: bool) -> None:
    """Print log lines as text, or one JSON object per line."""
    for line in lines:
        if as_json:
            click.echo(json.dumps(line.model_dump(mode="json")))
        else:
            click.echo(line.line.rstrip("\n"))
