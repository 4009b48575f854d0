"""`controller`: the Conveyor control plane on the command line.

Each command parses its arguments, calls one Backend method and prints the answer: a
fixed-width table (or readable sections) by default, the records as JSON with `--json`.
Errors are one line on stderr, `error: <message>`, with exit code 1 (2 for a usage
mistake: a bad option or argument; `tasks logs --follow` exits 3 when the task ended
failed, 4 when it ended stopped); the traceback only with `--debug`. Read-only
commands (`queues`, `queues show`, `tasks list|show|logs`, `workers`) refuse a SQLite
store file that does not exist instead of creating an empty one; commands that write
create it (the embedded default on first use), saying so in one line on stderr.

The Backend comes from `--api` (or `CONVEYOR_API`): an `http://host:port` of a
`controller serve` process, or a database URL; by default the embedded SQLite store under
`CONVEYOR_HOME`.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from controller import __version__
from controller.backend import Backend
from controller.cli_format import (
    echo_json,
    echo_log,
    echo_table,
    format_age,
    format_pipeline,
    format_task,
    format_time,
    next_offset,
)
from controller.connect import backend_from_url, conveyor_home, default_api_url
from controller.errors import (
    BackendUnavailableError,
    ConflictError,
    ConveyorError,
    NotFoundError,
)
from controller.models import QUEUE_NAME_RULE, TaskStatus, TaskType, is_queue_name

#: Seconds between two polls of `tasks logs --follow`.
FOLLOW_POLL_S = 0.5
#: Log lines asked for per call.
LOG_PAGE = 1000
#: Exit code of `tasks logs --follow` when the task ends failed.
EXIT_TASK_FAILED = 3
#: Exit code of `tasks logs --follow` when the task ends stopped (aborted).
EXIT_TASK_STOPPED = 4

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CliError(click.ClickException):
    """An error shown as one line, `error: <message>`, exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        """Print `error: <message>` on stderr."""
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "failed"


@dataclass
class State:
    """What the group options chose; opens the Backend on first use."""

    api: str | None
    token: str | None
    _backend: Backend | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The URL of the store or API the commands talk to."""
        return self.api or default_api_url()

    @property
    def backend(self) -> Backend:
        """The Backend for `url`, opened once and closed when the command ends."""
        if self._backend is None:
            url = self.url
            if url == embedded_db_url():
                conveyor_home().mkdir(parents=True, exist_ok=True)
            path = sqlite_file_of(url)
            new_store = path is not None and not path.exists()
            self._backend = backend_from_url(url, token=self.token)
            click.get_current_context().find_root().call_on_close(self._backend.close)
            if new_store:
                click.echo(f"conveyor: created a new store at {path} ({self.store_origin})", err=True)
        return self._backend

    @property
    def store_origin(self) -> str:
        """Where the store's URL comes from, and how to use another one."""
        if self.api is None:
            return "the embedded store of CONVEYOR_HOME; set CONVEYOR_API to use another"
        return "from --api or CONVEYOR_API"

    def note_default_store(self) -> None:
        """On stderr, which store an empty answer came from, when CONVEYOR_API was not set
        (a forgotten CONVEYOR_API shows an empty store, not an error)."""
        if self.api is None:
            click.echo(
                f"conveyor: this is the embedded store {sqlite_file_of(self.url)} "
                "(CONVEYOR_API is not set)",
                err=True,
            )

    @property
    def reader(self) -> Backend:
        """The Backend for a read-only command: a SQLite file that does not exist is an
        error (CliError), not an empty store created on the way."""
        if self._backend is None:
            path = sqlite_file_of(self.url)
            if path is not None and not path.exists():
                if self.url == embedded_db_url():
                    raise CliError(
                        f"no Conveyor store yet at {path} (the embedded store of CONVEYOR_HOME): "
                        "point --api or CONVEYOR_API at your store, or create a queue or task first"
                    )
                raise CliError(
                    f"no Conveyor store at {path}: the file does not exist; check the path in "
                    "--api or CONVEYOR_API (commands that write create it)"
                )
        return self.backend


def sqlite_file_of(url: str) -> Path | None:
    """The database file of a `sqlite:` URL (relative to the working folder if relative);
    None for other URLs or an in-memory database."""
    if not url.startswith("sqlite:"):
        return None
    import sqlalchemy  # only here: `agent` imports this module for OneLineErrorGroup

    try:
        database = sqlalchemy.engine.make_url(url).database
    except sqlalchemy.exc.ArgumentError:
        return None  # the store names the problem when it opens the URL
    if not database or database == ":memory:":
        return None
    return Path(database).expanduser()


class QueueNameType(click.ParamType):
    """A queue name, checked with the store's rule: a bad one is a usage error (exit 2)."""

    name = "queue"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """`value` if it is a valid queue name; a usage error naming it otherwise."""
        if not is_queue_name(value):
            several = " (name several queues as separate words)" if " " in str(value) else ""
            self.fail(f"{value!r} is not a queue name: use {QUEUE_NAME_RULE}{several}", param, ctx)
        return str(value)


QUEUE_NAME = QueueNameType()


def embedded_db_url() -> str:
    """The embedded SQLite store under CONVEYOR_HOME."""
    return f"sqlite:///{conveyor_home() / 'conveyor.db'}"


class OneLineErrorGroup(click.Group):
    """A root command group whose every error is one line on stderr, `error: <message>`.

    Exit code 1, or 2 for usage mistakes (which add where the help is). The traceback is
    printed too when the group's `--debug` option is on. Used by `controller` and `agent`.
    """

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; turn an error into a one-line CliError."""
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise
        except Exception as err:  # noqa: BLE001 - every error becomes one line
            if ctx.find_root().params.get("debug"):
                traceback.print_exc()
            state = ctx.obj if isinstance(ctx.obj, State) else None
            raise one_line_error(
                err, state.url if state else "", default_store=bool(state and state.api is None)
            ) from None

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        """Run as a console script: parse, invoke, print errors as one line, exit."""
        extra.pop("standalone_mode", None)  # always: the errors are printed here
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as err:
            where = f" (see '{err.ctx.command_path} --help')" if err.ctx else ""
            click.echo(f"error: {_one_line(err.format_message())}{where}", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"error: {_one_line(err.format_message())}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def one_line_error(err: Exception, url: str, *, default_store: bool = False) -> CliError:
    """The one-line CliError for an error of a command talking to `url`; with
    `default_store` (CONVEYOR_API not set), "not found" names the embedded store."""
    if isinstance(err, BackendUnavailableError):
        message = _one_line(err.message)
        if url and "://" not in message:  # say which API or store, once
            message = f"cannot reach {url}: {message}"
        return CliError(message)
    if isinstance(err, NotFoundError) and default_store:
        return CliError(
            f"{_one_line(err.message)} (in the embedded store {sqlite_file_of(url)}: "
            "CONVEYOR_API is not set)"
        )
    if isinstance(err, ConveyorError):
        return CliError(_one_line(err.message))
    if isinstance(err, ValidationError):
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in err.errors()
        ]
        return CliError("invalid input: " + "; ".join(problems))
    if isinstance(err, OSError):  # requests' connection errors are OSErrors too
        return CliError(f"cannot reach {url}: {_one_line(str(err))}" if url else _one_line(str(err)))
    return CliError(
        f"unexpected {type(err).__name__}: {_one_line(str(err))} (run with --debug for the "
        "traceback, and report it)"
    )


pass_state = click.make_pass_decorator(State)


def json_option(func: F) -> F:
    """Add `--json`: print the records as JSON instead of a table."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print the records as JSON instead of a table."
    )(func)


# ---------------------------------------------------------------------- root group


@click.group(cls=OneLineErrorGroup, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--api",
    envvar="CONVEYOR_API",
    metavar="URL",
    help="Control plane to use: http://host:port of a 'controller serve', or a database URL "
    "(sqlite:///path, postgresql://...). [env: CONVEYOR_API; default: the embedded SQLite "
    "store under CONVEYOR_HOME]",
)
@click.option(
    "--token",
    envvar="CONVEYOR_API_TOKEN",
    metavar="TOKEN",
    help="API token sent to an http:// API. [env: CONVEYOR_API_TOKEN]",
)
@click.option(
    "--debug",
    is_flag=True,
    envvar="CONVEYOR_DEBUG",
    help="Print the traceback of an error too (errors are one line without it). "
    "[env: CONVEYOR_DEBUG]",
)
@click.version_option(__version__, "--version", prog_name="controller")
@click.pass_context
def cli(ctx: click.Context, api: str | None, token: str | None, debug: bool) -> None:
    """Conveyor control plane: tasks, queues and workers."""
    ctx.obj = State(api=(api or "").strip() or None, token=token or None)


# --------------------------------------------------------------------------- serve


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar="CONVEYOR_HOST",
    help="Address to listen on. [env: CONVEYOR_HOST]",
)
@click.option(
    "--port",
    default=8008,
    show_default=True,
    type=click.IntRange(0, 65535),
    envvar="CONVEYOR_PORT",
    help="Port to listen on. [env: CONVEYOR_PORT]",
)
@click.option(
    "--db",
    "db_url",
    envvar="CONVEYOR_DB",
    metavar="URL",
    help="Database of the store (sqlite:///path or postgresql://...). [env: CONVEYOR_DB; "
    "default: --api if it is a database URL, else the embedded SQLite store]",
)
@click.option(
    "--token",
    "serve_token",
    metavar="TOKEN",
    help="Token clients must send. Default: the group's "
    "--token / CONVEYOR_API_TOKEN; none means an open API.",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Server log level; 'info' and 'debug' also log every request.",
)
@click.option(
    "--files-dir",
    envvar="CONVEYOR_FILES_DIR",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Folder of the files endpoint, where steps store artifacts and models. "
    "[env: CONVEYOR_FILES_DIR; default: $CONVEYOR_HOME/files]",
)
@click.option(
    "--public-url",
    envvar="CONVEYOR_PUBLIC_URL",
    metavar="URL",
    help="Address people and code outside Conveyor reach this server by (e.g. "
    "http://conveyor.example:8008): the dashboard's download links and "
    "Artifact.public_url use it. [env: CONVEYOR_PUBLIC_URL; default: the address the "
    "client used]",
)
@pass_state
def serve(
    state: State,
    host: str,
    port: int,
    db_url: str | None,
    serve_token: str | None,
    log_level: str,
    files_dir: str | None,
    public_url: str | None,
) -> None:
    """Run the HTTP API server over a database."""
    if public_url:
        from controller.http_session import check_api_url

        try:
            check_api_url(public_url)
        except ConveyorError as err:
            raise CliError(f"--public-url: {_one_line(err.message)}") from None
    if not db_url:
        api = state.api or default_api_url()
        db_url = api if not api.startswith(("http://", "https://")) else embedded_db_url()
    if db_url == embedded_db_url():
        conveyor_home().mkdir(parents=True, exist_ok=True)
    token = serve_token or state.token
    from controller.server import serve as run_server

    # The server prints "Conveyor API on http://HOST:PORT (...; store URL)" once the
    # store is open, with the password of the URL hidden.
    run_server(
        host=host, port=port, db_url=db_url, token=token, log_level=log_level.lower(),
        files_dir=files_dir, public_url=public_url,
    )


# -------------------------------------------------------------------------- queues


@cli.group(invoke_without_command=True, context_settings=CONTEXT_SETTINGS)
@json_option
@click.pass_context
def queues(ctx: click.Context, as_json: bool) -> None:
    """List queues, or manage them with a subcommand."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(queues_list, as_json=as_json)


@queues.command("list")
@json_option
@pass_state
def queues_list(state: State, as_json: bool) -> None:
    """List queues with their length and oldest waiting task."""
    items = state.reader.list_queues()
    if as_json:
        echo_json(items)
        return
    rows = [[q.name, q.length, format_age(q.oldest_queued_at)] for q in items]
    echo_table(["NAME", "LENGTH", "OLDEST WAITING"], rows, "No queues.", right=[1])


@queues.command("show")
@click.argument("name", type=QUEUE_NAME)
@json_option
@pass_state
def queues_show(state: State, name: str, as_json: bool) -> None:
    """Show the tasks waiting in queue NAME, in the order they will run."""
    tasks = state.reader.queue_tasks(name)
    if as_json:
        echo_json(tasks)
        return
    rows = [[t.id, t.name, t.project, t.execution.priority, format_age(t.queued_at)] for t in tasks]
    echo_table(
        ["ID", "NAME", "PROJECT", "PRIORITY", "WAITING"], rows, f"Queue {name} is empty.", right=[3]
    )


@queues.command("create")
@click.argument("name", type=QUEUE_NAME)
@json_option
@pass_state
def queues_create(state: State, name: str, as_json: bool) -> None:
    """Create queue NAME."""
    queue = state.backend.create_queue(name)
    if as_json:
        echo_json(queue)
    else:
        click.echo(f"Created queue {queue.name}.")


@queues.command("delete")
@click.argument("name", type=QUEUE_NAME)
@click.option(
    "--force", is_flag=True, help="Delete even if tasks wait in it; they go back to status created."
)
@pass_state
def queues_delete(state: State, name: str, force: bool) -> None:
    """Delete queue NAME."""
    try:
        state.backend.delete_queue(name, force=force)
    except ConflictError as err:
        if force:
            raise
        raise CliError(f"{_one_line(err.message)} (use --force to delete it anyway)") from None
    click.echo(f"Deleted queue {name}.")


# --------------------------------------------------------------------------- tasks


@cli.group(context_settings=CONTEXT_SETTINGS)
def tasks() -> None:
    """Create, list, inspect and control tasks."""


@tasks.command("list")
@click.option("--project", help="Only tasks of this project.")
@click.option("--name", help="Only tasks with this name.")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s.value for s in TaskStatus], case_sensitive=False),
    help="Only tasks in this status (repeat for several).",
)
@click.option(
    "--tag", "tags", multiple=True, help="Only tasks with this tag (repeat: all of them)."
)
@click.option("--parent", help="Only children of this task id.")
@click.option(
    "--type",
    "task_type",
    type=click.Choice([t.value for t in TaskType]),
    help="Only tasks of this type.",
)
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Show at most this many tasks (newest first).",
)
@json_option
@pass_state
def tasks_list(
    state: State,
    project: str | None,
    name: str | None,
    statuses: tuple[str, ...],
    tags: tuple[str, ...],
    parent: str | None,
    task_type: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List tasks, newest first."""
    items = state.reader.query_tasks(
        project=project,
        name=name,
        status=[s.lower() for s in statuses] or None,
        tags=list(tags) or None,
        parent=parent,
        type=task_type,
        limit=limit,
    )
    if as_json:
        echo_json(items)
        return
    rows = [
        [t.id, t.name, t.project, t.status.value, t.execution.queue, format_time(t.created_at)]
        for t in items
    ]
    echo_table(["ID", "NAME", "PROJECT", "STATUS", "QUEUE", "CREATED"], rows, "No tasks.")
    if not rows:
        state.note_default_store()


@tasks.command("show")
@click.argument("task_id", metavar="ID")
@json_option
@pass_state
def tasks_show(state: State, task_id: str, as_json: bool) -> None:
    """Show every section of task ID; a pipeline's steps as a table (its DAG)."""
    task = state.reader.get_task(task_id)
    if as_json:
        echo_json(task)
        return
    click.echo(format_task(task))
    pipeline = format_pipeline(task)
    if pipeline:
        click.echo(pipeline)


def _drain_log(backend: Backend, task_id: str, offset: int, as_json: bool) -> int:
    """Print every line from `offset` on; return the offset after the last one."""
    while True:
        lines = backend.get_log(task_id, offset=offset, limit=LOG_PAGE)
        echo_log(lines, as_json)
        offset = next_offset(lines, offset)
        if len(lines) < LOG_PAGE:
            return offset


@tasks.command("logs")
@click.argument("task_id", metavar="ID")
@click.option("--tail", type=click.IntRange(0), metavar="N", help="Only the last N lines.")
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Keep printing new lines until the task finishes (completed, failed or stopped).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print each line as a JSON object (JSON Lines) with stream, timestamp and n.",
)
@pass_state
def tasks_logs(state: State, task_id: str, tail: int | None, follow: bool, as_json: bool) -> None:
    """Print the output of task ID.

    With --follow, the exit code says how the task ended: 0 completed, 3 failed,
    4 stopped (aborted).
    """
    backend = state.reader
    if tail is not None:
        backend.get_task(task_id)  # an unknown id is an error, not an empty log
        lines = backend.get_log(task_id, tail=tail) if tail else []
        echo_log(lines, as_json)
        if not lines:  # --tail 0: start after the current last line
            lines = backend.get_log(task_id, tail=1)
        offset = next_offset(lines, 0)
    else:
        backend.get_task(task_id)
        offset = _drain_log(backend, task_id, 0, as_json)
    while follow:
        # Read the status before the log: once it is terminal, the read that follows
        # holds every line the task wrote.
        status = backend.get_task(task_id).status
        before = offset
        offset = _drain_log(backend, task_id, offset, as_json)
        if status.is_terminal:
            sys.exit(follow_exit_code(status))
        if offset == before:
            time.sleep(FOLLOW_POLL_S)


def follow_exit_code(status: TaskStatus) -> int:
    """The exit code of `tasks logs --follow` for a task that ended in `status`."""
    if status == TaskStatus.failed:
        return EXIT_TASK_FAILED
    if status == TaskStatus.stopped:
        return EXIT_TASK_STOPPED
    return 0


@tasks.command("enqueue")
@click.argument("task_id", metavar="ID")
@click.option(
    "--queue",
    "-q",
    type=QUEUE_NAME,
    help="Queue to put it on. [default: the task's execution.queue, else 'default']",
)
@click.option("--priority", "-p", type=int, help="Higher runs first. [default: the task's own]")
@json_option
@pass_state
def tasks_enqueue(
    state: State, task_id: str, queue: str | None, priority: int | None, as_json: bool
) -> None:
    """Put task ID on a queue to run."""
    task = state.backend.enqueue(task_id, queue, priority=priority)
    if as_json:
        echo_json(task)
    else:
        click.echo(
            f"Task {task.id} queued on {task.execution.queue or queue or 'default'} "
            f"(priority {task.execution.priority})."
        )


@tasks.command("abort")
@click.argument("task_id", metavar="ID")
@click.option("--message", "-m", default="", help="Why; recorded as the status message.")
@json_option
@pass_state
def tasks_abort(state: State, task_id: str, message: str, as_json: bool) -> None:
    """Abort task ID (a running task is stopped by its worker)."""
    task = state.backend.abort_task(task_id, message=message)
    if as_json:
        echo_json(task)
    else:
        click.echo(f"Task {task.id} {task.status.value}.")


@tasks.command("reset")
@click.argument("task_id", metavar="ID")
@json_option
@pass_state
def tasks_reset(state: State, task_id: str, as_json: bool) -> None:
    """Bring task ID back to created, clearing its log, outputs and runtime."""
    task = state.backend.reset_task(task_id)
    if as_json:
        echo_json(task)
    else:
        click.echo(f"Task {task.id} reset to {task.status.value}.")


class DurationType(click.ParamType):
    """A length of time: seconds ("90", "90s") or with a unit ("10m", "2h", "1d")."""

    name = "duration"
    UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        """`value` in seconds (> 0); a usage error naming it otherwise."""
        if isinstance(value, int | float):
            seconds = float(value)
        else:
            text = str(value).strip().lower()
            factor = self.UNITS_S.get(text[-1:], None)
            try:
                seconds = float(text[:-1] if factor else text) * (factor or 1.0)
            except ValueError:
                seconds = -1.0
        if not seconds > 0:
            self.fail(f"{value!r} is not a time limit: seconds > 0, e.g. 90, 10m, 2h", param, ctx)
        return seconds


DURATION = DurationType()


def _argument_pair(text: str) -> tuple[str, Any]:
    """`NAME=VALUE` as (NAME, VALUE); a bare `NAME` is a flag (NAME, True)."""
    name, sep, value = text.partition("=")
    name = name.strip().lstrip("-")
    if not name:
        raise click.BadParameter(f"{text!r}: use NAME=VALUE (or NAME for a flag)")
    return (name, value) if sep else (name, True)


def id_only_option(func: F) -> F:
    """Add `--id-only`: print only the new task's id (for scripts)."""
    return click.option(
        "--id-only", is_flag=True, help="Print only the new task's id (for scripts)."
    )(func)


def _echo_created(task: Any, verb: str, as_json: bool, id_only: bool) -> None:
    if as_json:
        echo_json(task)
        return
    if id_only:
        click.echo(task.id)
        return
    where = f", queued on {task.execution.queue}" if task.status == TaskStatus.queued else ""
    click.echo(f"{verb} task {task.id} ({task.name}){where}.")


@tasks.command("create")
@click.option("--name", help="Task name. [default: the script's file name or the module]")
@click.option("--project", default="", help="Project name.")
@click.option(
    "--type",
    "task_type",
    type=click.Choice([t.value for t in TaskType]),
    default=TaskType.training.value,
    show_default=True,
    help="Task type.",
)
@click.option(
    "--script",
    metavar="PATH",
    help="Python script to run: a local file (inside a git work tree: that repository, "
    "pinned to its commit and uncommitted changes; else its code is stored), or with "
    "--repo a path inside the repository.",
)
@click.option(
    "--single-file",
    is_flag=True,
    help="Store the local --script's code in the task even inside a git work tree.",
)
@click.option("--module", metavar="MODULE", help="Run 'python -m MODULE' instead of a script.")
@click.option(
    "--arg",
    "args",
    multiple=True,
    metavar="NAME=VALUE",
    help="Command-line argument '--NAME=VALUE' (just NAME: a flag '--NAME'), also shown "
    "as the parameter Args/NAME; repeat for several.",
)
@click.option("--repo", metavar="URL|PATH", help="Git repository: a URL or a local work tree.")
@click.option("--branch", help="Branch of --repo to run. [default: a local work tree's own]")
@click.option("--commit", help="Commit of --repo to run.")
@click.option(
    "--working-dir", metavar="DIR", help="Folder to run in, relative to the repository root."
)
@click.option(
    "--package",
    "packages",
    multiple=True,
    metavar="REQUIREMENT",
    help="Package to install (pip requirement, e.g. numpy==1.26.4); repeat for several.",
)
@click.option(
    "--requirements",
    metavar="FILE",
    help="Requirements file: a path inside the repository, or a local file whose lines "
    "become the packages.",
)
@click.option(
    "--queue", "-q", type=QUEUE_NAME, help="Enqueue the new task on this queue at once."
)
@click.option("--priority", "-p", type=int, help="Priority on --queue (higher runs first).")
@click.option(
    "--time-limit",
    type=DURATION,
    metavar="DURATION",
    help="Longest the task may run (90, 90s, 10m, 2h); the agent then stops it (status "
    "stopped, reason time_limit).",
)
@click.option("--docker", "docker_image", metavar="IMAGE", help="Container image to run in.")
@click.option("--docker-args", metavar="ARGS", help="Arguments for 'docker run', e.g. '--shm-size 1g'.")
@click.option(
    "--docker-setup-script",
    type=click.File("r"),
    metavar="FILE",
    help="Shell script run in the container before the step.",
)
@click.option("--tag", "tags", multiple=True, help="Tag; repeat for several.")
@id_only_option
@json_option
@pass_state
def tasks_create(
    state: State,
    name: str | None,
    project: str,
    task_type: str,
    script: str | None,
    single_file: bool,
    module: str | None,
    args: tuple[str, ...],
    repo: str | None,
    branch: str | None,
    commit: str | None,
    working_dir: str | None,
    packages: tuple[str, ...],
    requirements: str | None,
    queue: str | None,
    priority: int | None,
    time_limit: float | None,
    docker_image: str | None,
    docker_args: str | None,
    docker_setup_script: Any,
    tags: tuple[str, ...],
    id_only: bool,
    as_json: bool,
) -> None:
    """Create a task (a draft, or queued with --queue) that runs a script or a module.

    \b
    controller tasks create --script train.py --arg epochs=3 --package numpy --queue default
    controller tasks create --repo https://github.com/me/proj.git --branch main \\
        --script src/train.py --time-limit 2h --docker python:3.11
    """
    if not script and not module:
        raise click.UsageError("give --script PATH or --module MODULE")
    if script and module:
        raise click.UsageError("give --script or --module, not both")
    if priority is not None and not queue:
        raise click.UsageError("--priority needs --queue")
    if single_file and (not script or repo):
        raise click.UsageError("--single-file applies to a local --script (without --repo)")
    from controller.sdk.task import task_changes_for_create

    try:
        spec = task_changes_for_create(
            project_name=project,
            task_name=name,
            task_type=task_type,
            repo=repo,
            branch=branch,
            commit=commit,
            script=script,
            working_directory=working_dir,
            packages=list(packages) or None,
            requirements_file=requirements,
            docker=docker_image,
            docker_args=docker_args,
            docker_bash_setup_script=docker_setup_script.read() if docker_setup_script else None,
            argparse_args=[_argument_pair(a) for a in args] or None,
            module=module,
            time_limit_s=time_limit,
            force_single_script_file=single_file,
        )
    except (ValueError, OSError) as err:
        raise CliError(_one_line(str(err)).replace("Task.create: ", "")) from None
    if tags:
        spec["tags"] = list(tags)
    backend = state.backend
    task = backend.create_task(spec)
    if queue:
        task = backend.enqueue(task.id, queue, priority=priority)
    _echo_created(task, "Created", as_json, id_only)


@tasks.command("clone")
@click.argument("task_id", metavar="ID")
@click.option("--name", help="Name of the copy. [default: the task's own]")
@click.option("--project", help="Project of the copy. [default: the task's own]")
@click.option("--queue", "-q", type=QUEUE_NAME, help="Enqueue the copy on this queue at once.")
@click.option("--priority", "-p", type=int, help="Priority on --queue (higher runs first).")
@click.option(
    "--time-limit",
    type=DURATION,
    metavar="DURATION",
    help="Time limit of the copy (90, 90s, 10m, 2h). [default: the task's own]",
)
@id_only_option
@json_option
@pass_state
def tasks_clone(
    state: State,
    task_id: str,
    name: str | None,
    project: str | None,
    queue: str | None,
    priority: int | None,
    time_limit: float | None,
    id_only: bool,
    as_json: bool,
) -> None:
    """Copy task ID's definition into a new draft (outputs, log and runtime are not copied)."""
    if priority is not None and not queue:
        raise click.UsageError("--priority needs --queue")
    backend = state.backend
    task = backend.clone_task(task_id, name=name, project=project)
    if time_limit is not None:
        task = backend.edit_task(task.id, {"execution": {"time_limit_s": time_limit}})
    if queue:
        task = backend.enqueue(task.id, queue, priority=priority)
    _echo_created(task, f"Cloned {task_id} as", as_json, id_only)


@tasks.command("delete")
@click.argument("task_id", metavar="ID")
@click.option("--force", is_flag=True, help="Delete even if it (or a step of it) is active.")
@pass_state
def tasks_delete(state: State, task_id: str, force: bool) -> None:
    """Delete task ID with its log and files; a pipeline with its steps."""
    try:  # the server removes the files of what it deletes
        deleted = state.backend.delete_task(task_id, force=force)
    except ConflictError as err:
        raise CliError(f"{_one_line(err.message)} (use --force to delete it anyway)") from None
    if not state.url.startswith(("http://", "https://")):  # the files area is this machine's
        from controller.sdk.storage import files_dir
        from controller.server.files import remove_task_files

        for record in deleted:
            remove_task_files(files_dir(), record)
    task, steps = deleted[-1], deleted[:-1]
    extra = f" and its {len(steps)} step(s)" if steps else ""
    click.echo(f"Deleted task {task.id}{extra}.")


# -------------------------------------------------------------------------- files


@cli.group(context_settings=CONTEXT_SETTINGS)
def files() -> None:
    """The files area of a server (artifacts and models stored by steps)."""


@files.command("gc")
@click.option(
    "--files-dir",
    "files_dir_option",
    envvar="CONVEYOR_FILES_DIR",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="The files area (that of 'controller serve'; run this on its machine). "
    "[env: CONVEYOR_FILES_DIR; default: $CONVEYOR_HOME/files]",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@pass_state
def files_gc(state: State, files_dir_option: str | None, dry_run: bool) -> None:
    """Remove the files of tasks that no longer exist (folders <project>/<task id>/)."""
    from controller.errors import NotFoundError
    from controller.sdk.storage import files_dir
    from controller.server.files import collect_garbage

    backend = state.backend

    def task_exists(task_id: str) -> bool:
        try:
            backend.get_task(task_id)
        except NotFoundError:
            return False
        return True

    root = Path(files_dir_option).expanduser() if files_dir_option else files_dir()
    removed = collect_garbage(root, task_exists, dry_run=dry_run)
    verb = "Would remove" if dry_run else "Removed"
    for folder in removed:
        click.echo(f"{verb} {folder}")
    click.echo(f"{verb} {len(removed)} folder(s) of deleted tasks from {root}.")


# ----------------------------------------------------------------------- pipelines


@cli.group(context_settings=CONTEXT_SETTINGS)
def pipelines() -> None:
    """Control pipelines (their controller tasks)."""


@pipelines.command("resume")
@click.argument("pipeline_id", metavar="ID")
@click.option(
    "--queue",
    "-q",
    type=QUEUE_NAME,
    help="Queue of the agent that resumes it. [default: the pipeline's own, else 'services']",
)
@json_option
@pass_state
def pipelines_resume(state: State, pipeline_id: str, queue: str | None, as_json: bool) -> None:
    """Resume failed, stopped or lost pipeline ID from its record: completed steps are
    reused, queued or running ones followed, failed and aborted ones run again, and only
    what never started is launched. To run it again from scratch instead:
    `controller tasks reset ID` then `controller tasks enqueue ID`."""
    from controller.pipeline.state import request_resume

    task = request_resume(state.backend, pipeline_id, queue)
    if as_json:
        echo_json(task)
    else:
        click.echo(f"Pipeline {task.id} queued on {task.execution.queue} to resume from its record.")


# ------------------------------------------------------------------------- workers


@cli.command(context_settings=CONTEXT_SETTINGS)
@json_option
@pass_state
def workers(state: State, as_json: bool) -> None:
    """List registered workers and what they run."""
    items = state.reader.list_workers()
    if as_json:
        echo_json(items)
        return
    rows = [
        [
            w.id,
            w.hostname,
            ",".join(w.queues),
            w.slots,
            format_age(w.last_seen),
            ",".join(w.current_tasks) or "-",
        ]
        for w in items
    ]
    echo_table(
        ["ID", "HOSTNAME", "QUEUES", "SLOTS", "LAST SEEN", "TASKS"], rows, "No workers.", right=[3]
    )
    if not rows:
        state.note_default_store()


def main() -> None:
    """Entry point of the `controller` console script."""
    try:
        cli.main(prog_name="controller")
    except BrokenPipeError:  # output piped into `head` and the like
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
