"""Task: what step code (and a pipeline controller) uses to talk to its task.

`Task.init()` outside an agent creates a task for the running script (its code, git
state and packages; see `controller.sdk.script_info`) and ties its status to the
process (`controller.sdk.lifecycle`). Under an agent (`CONVEYOR_TASK_ID` set) it
attaches to the task the agent runs, changes no status (the agent reports how the
step ended), and `connect()` returns the values stored on the task, so a clone with
overridden parameters runs with them.

Everything goes through the Backend of `CONVEYOR_API` (`controller.connect.get_backend`),
so the same code works on the embedded store and over HTTP. Errors are never turned
into return values: an unknown task, a bad name or a failed upload raises, naming what
was wrong.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from controller.backend import _UNSET, Backend
from controller.connect import get_backend
from controller.errors import NotFoundError
from controller.models import StatusReason, TaskRecord, TaskStatus, TaskType
from controller.sdk import lifecycle, params, storage
from controller.sdk.artifacts import Artifacts, upload_artifact
from controller.sdk.logger import Logger
from controller.sdk.task_params import TaskParameters

if TYPE_CHECKING:  # loaded where used: a step under an agent needs neither
    from controller.sdk.output_model import ModelList

#: Environment variable the agent sets to the id of the task it runs.
TASK_ID_ENV = "CONVEYOR_TASK_ID"
#: Hyperparameter section the agent turns into environment variables.
ENVIRONMENT_SECTION = "Environment"

TaskTypes = TaskType


class TaskNotFoundError(NotFoundError, ValueError):
    """No task matches the id or name asked for (a ValueError too, as in the reference)."""


def _task_type(task_type: TaskType | str | None) -> str:
    if task_type is None:
        return TaskType.training.value
    try:
        return TaskType(task_type).value
    except ValueError:
        known = ", ".join(t.value for t in TaskType)
        raise ValueError(f"unknown task type {task_type!r}: one of {known}") from None


class Task(TaskParameters):
    """A task in the store, as step code sees it (the reference's Task).

    Parameters (`connect`, `get_parameters`, ...) come from `TaskParameters`.
    """

    TaskTypes = TaskType
    _current: ClassVar[Task | None] = None

    def __init__(self, record: TaskRecord, backend: Backend | None = None, *, own: bool = False) -> None:
        """Use `Task.init`, `Task.get_task`, `Task.create` or `Task.clone` instead."""
        self._record = record
        self._backend = backend or get_backend()
        self._own = own  # this process runs the task: it may edit it in any status
        self._output_uri: str | None = None

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.project}/{self.name} {self._record.status.value}>"

    # ------------------------------------------------------------ identity
    @property
    def id(self) -> str:
        """The task's id."""
        return self._record.id

    @property
    def name(self) -> str:
        """The task's name."""
        return self._record.name

    @property
    def project(self) -> str:
        """The task's project name (Conveyor has no separate project ids)."""
        return self._record.project

    @property
    def task_type(self) -> TaskType:
        """The task's type."""
        return self._record.type

    @property
    def parent(self) -> str | None:
        """The id of the parent task (a pipeline's controller task), if any."""
        return self._record.parent

    @property
    def data(self) -> TaskRecord:
        """The whole task record, as of the last `reload()`."""
        return self._record

    @property
    def status(self) -> str:
        """The current status, read from the store."""
        return self.get_status()

    @property
    def output_uri(self) -> str:
        """Where artifacts and models go: set here, else the task's Environment section
        `CONVEYOR_OUTPUT_URI`, else that environment variable, else the store's files area."""
        if self._output_uri:
            return self._output_uri
        stored = (self._record.hyperparams.get(ENVIRONMENT_SECTION) or {}).get(storage.OUTPUT_URI_ENV)
        return str(stored) if stored else storage.default_output_uri(self._backend)

    @output_uri.setter
    def output_uri(self, value: str | None) -> None:
        self._output_uri = value or None

    # ----------------------------------------------------------- create/find
    @classmethod
    def init(
        cls,
        project_name: str | None = None,
        task_name: str | None = None,
        task_type: TaskType | str = TaskType.training,
        tags: Sequence[str] | None = None,
        reuse_last_task_id: bool = True,
        continue_last_task: bool = False,
        output_uri: str | bool | None = None,
        auto_connect_arg_parser: bool = True,
        auto_connect_frameworks: bool = True,
        auto_resource_monitoring: bool = True,
        auto_connect_streams: bool = True,
        deferred_init: bool = False,
    ) -> Task:
        """The task of this process: a new one for a local run, the agent's under an agent.

        Locally the task records the script (git repository, branch, commit and diff,
        or its code), its imported packages pinned to installed versions, is in_progress
        now and completed/failed when the process exits. `output_uri` (a URL string) is
        recorded in the task's Environment section as `CONVEYOR_OUTPUT_URI`, so clones
        run by agents store there too; True/False/None mean the default. A second call
        returns the same task. Every local run makes a new task (`reuse_last_task_id`
        and `continue_last_task` are not supported); the `auto_*` options are accepted
        and do nothing (no framework hooks, no stream capture). Under an agent the
        process then ends without the interpreter's final garbage collection walk
        (`lifecycle.freeze_at_exit`); exit handlers and the Logger's last flush still run.
        """
        if cls._current is not None:
            return cls._current
        uri = output_uri if isinstance(output_uri, str) and output_uri else None
        backend = get_backend()
        agent_task_id = os.environ.get(TASK_ID_ENV)
        if agent_task_id:
            task = cls(cls._fetch(backend, agent_task_id), backend, own=True)
            if uri and not os.environ.get(storage.OUTPUT_URI_ENV):  # the task's own setting wins
                task._output_uri = uri
            cls._current = task
            lifecycle.freeze_at_exit()  # a step's process ends without the final GC walk
            return task
        import socket

        from controller.sdk import script_info

        script, packages = script_info.describe_running_script()
        main, _ = script_info.main_script()
        spec: dict[str, Any] = {
            "name": task_name or (main.stem if main else "interactive"),
            "project": project_name or "",
            "type": _task_type(task_type),
            "tags": list(tags or []),
            "script": script,
            "packages": packages,
        }
        if uri:
            spec["hyperparams"] = {ENVIRONMENT_SECTION: {storage.OUTPUT_URI_ENV: uri}}
        record = backend.create_task(spec)
        record = backend.set_status(
            record.id, TaskStatus.in_progress, reason=StatusReason.started,
            message=f"started by Task.init (pid {os.getpid()} on {socket.gethostname()})",
        )
        task = cls(record, backend, own=True)
        cls._current = task
        lifecycle.watch(task)
        return task

    @classmethod
    def current_task(cls) -> Task | None:
        """The task of this process: the one `Task.init` returned, or under an agent the
        task the agent runs (attached on first use, without calling Task.init); None otherwise."""
        if cls._current is None and os.environ.get(TASK_ID_ENV):
            return cls.init()
        return cls._current

    @classmethod
    def running_locally(cls) -> bool:
        """True unless this process is a step run by an agent."""
        return not os.environ.get(TASK_ID_ENV)

    def running_remotely(self) -> bool:
        """True if this task is the one an agent runs in this process."""
        return os.environ.get(TASK_ID_ENV) == self.id

    @staticmethod
    def _fetch(backend: Backend, task_id: str) -> TaskRecord:
        try:
            return backend.get_task(task_id)
        except NotFoundError:
            raise TaskNotFoundError(f"no task with id {task_id!r}", field="task_id") from None

    @classmethod
    def get_task(
        cls,
        task_id: str | None = None,
        project_name: str | None = None,
        task_name: str | None = None,
        tags: Sequence[str] | None = None,
        allow_archived: bool = True,
        task_filter: Mapping[str, Any] | None = None,
    ) -> Task:
        """A task by id, or the most recently created one named `task_name` (in
        `project_name` if given, with all `tags`). Names match exactly.

        Raises TaskNotFoundError (a ValueError) naming the id or name when none matches.
        """
        backend = get_backend()
        if task_id:
            return cls(cls._fetch(backend, task_id), backend)
        if not task_name:
            raise ValueError("Task.get_task: give task_id, or task_name (and project_name)")
        found = backend.query_tasks(project=project_name, name=task_name, tags=list(tags or []) or None, limit=1)
        if not found:
            where = f" in project {project_name!r}" if project_name is not None else ""
            raise TaskNotFoundError(f"no task named {task_name!r}{where}", field="task_name")
        return cls(found[0], backend)

    @classmethod
    def get_tasks(
        cls,
        task_ids: Sequence[str] | None = None,
        project_name: str | None = None,
        task_name: str | None = None,
        tags: Sequence[str] | None = None,
    ) -> list[Task]:
        """Tasks by ids, or every task matching name/project/tags (newest first, ≤ 1000)."""
        backend = get_backend()
        if task_ids:
            return [cls(cls._fetch(backend, i), backend) for i in task_ids]
        records = backend.query_tasks(
            project=project_name, name=task_name, tags=list(tags or []) or None, limit=1000
        )
        return [cls(r, backend) for r in records]

    @classmethod
    def create(
        cls,
        project_name: str | None = None,
        task_name: str | None = None,
        task_type: TaskType | str | None = None,
        repo: str | None = None,
        branch: str | None = None,
        commit: str | None = None,
        script: str | None = None,
        working_directory: str | None = None,
        packages: Sequence[str] | bool | None = None,
        requirements_file: str | os.PathLike[str] | None = None,
        docker: str | None = None,
        docker_args: str | None = None,
        docker_bash_setup_script: str | None = None,
        argparse_args: Sequence[tuple[str, Any]] | None = None,
        base_task_id: str | None = None,
        add_task_init_call: bool = True,
        force_single_script_file: bool = False,
        module: str | None = None,
        time_limit_s: float | None = None,
    ) -> Task:
        """A new draft task (status created) running `script` (or `module`) from `repo` or a local file.

        `repo` is a repository URL or a local git work tree (then pinned to its branch,
        commit and uncommitted diff unless `branch`/`commit` are given); without `repo`,
        a local `script` inside a git work tree uses that repository, and one outside
        is stored as code. `module` runs `python -m MODULE` instead of a script (from
        `repo` if given, else a module of the task's packages). `packages` is a list of
        requirements, or True to detect them from the script's imports; `requirements_file`
        is a path inside the repository, or a local file whose lines become the packages.
        `argparse_args` pairs become `--name=value` on the command line (a value of True
        or None: just `--name`) and are shown in the "Args" section. `time_limit_s` is
        the longest the task may run, in seconds: an agent stops it then (status
        stopped, reason time_limit; see `set_time_limit`). With `base_task_id`, the base task is cloned and
        the given fields replace its own. `add_task_init_call` is not needed: the agent
        links the step to its task through `CONVEYOR_TASK_ID`.
        """
        backend = get_backend()
        changes = task_changes_for_create(
            project_name=project_name, task_name=task_name, task_type=task_type, repo=repo,
            branch=branch, commit=commit, script=script, working_directory=working_directory,
            packages=packages, requirements_file=requirements_file, docker=docker,
            docker_args=docker_args, docker_bash_setup_script=docker_bash_setup_script,
            argparse_args=argparse_args, force_single_script_file=force_single_script_file,
            module=module, time_limit_s=time_limit_s, based_on_a_task=base_task_id is not None,
        )
        if base_task_id:
            record = backend.clone_task(cls._fetch(backend, base_task_id).id)
            if changes:
                record = backend.edit_task(record.id, changes)
        else:
            record = backend.create_task(changes)
        return cls(record, backend)

    @classmethod
    def clone(
        cls,
        source_task: Task | str | None = None,
        name: str | None = None,
        comment: str | None = None,
        parent: str | None = None,
        project: str | None = None,
    ) -> Task:
        """A draft copy of `source_task` (a Task or an id; default: the current task).

        The copy keeps the source's name unless `name` is given, and the source's
        parent unless `parent` is given. Outputs, logs and runtime are not copied.
        """
        source = source_task if source_task is not None else cls.current_task()
        if source is None:
            raise ValueError("Task.clone: give source_task (there is no current task)")
        source_id = source.id if isinstance(source, Task) else str(source)
        backend = get_backend()
        cls._fetch(backend, source_id)
        record = backend.clone_task(
            source_id, name=name, project=project, parent=parent if parent is not None else _UNSET
        )
        if comment is not None:
            record = backend.edit_task(record.id, {"comment": comment})
        return cls(record, backend)

    @classmethod
    def enqueue(
        cls,
        task: Task | str,
        queue_name: str | None = None,
        queue_id: str | None = None,
        force: bool = False,
    ) -> Task:
        """Put a draft (or finished: a re-run) task on a queue; returns the task as queued.

        The queue defaults to the task's execution queue, else "default". `force` is
        not needed: a finished task is simply run again.
        """
        task_id = task.id if isinstance(task, Task) else str(task)
        backend = get_backend()
        cls._fetch(backend, task_id)
        return cls(backend.enqueue(task_id, queue_name or queue_id), backend)

    @classmethod
    def dequeue(cls, task: Task | str) -> Task:
        """Take a queued task off its queue (back to created)."""
        task_id = task.id if isinstance(task, Task) else str(task)
        backend = get_backend()
        return cls(backend.dequeue(task_id), backend)

    def set_time_limit(self, seconds: float | None) -> None:
        """Let an agent run this task for at most `seconds` (None: no limit); past it the
        agent stops the task (status stopped, reason time_limit). A draft's setting; the task of this
        process may change its own too (it applies from the next run)."""
        self._record = self._backend.edit_task(
            self.id, {"execution": {"time_limit_s": _time_limit(seconds)}}, force=self._own
        )

    def get_time_limit(self) -> float | None:
        """The task's time limit in seconds (None: no limit)."""
        return self.reload()._record.execution.time_limit_s

    # --------------------------------------------------------------- status
    def reload(self) -> Task:
        """Read the task again from the store."""
        self._record = self._backend.get_task(self.id)
        return self

    def get_status(self) -> str:
        """The current status ("created", "queued", "in_progress", "completed", ...)."""
        return self.reload()._record.status.value

    def mark_stopped(self, force: bool = False, status_message: str | None = None) -> None:
        """Stop the task: a draft or queued task at once; a task an agent runs is aborted
        (the agent stops it); the task of this local process is marked stopped."""
        self.reload()
        status = self._record.status
        message = status_message or "stopped by mark_stopped()"
        if status.is_terminal or status == TaskStatus.stopping:
            return
        if status == TaskStatus.in_progress and not self._record.runtime.worker:
            if lifecycle.is_watched(self):
                lifecycle.settle()
            self._record = self._backend.set_status(self.id, TaskStatus.stopped, reason=StatusReason.aborted, message=message)
            return
        self._record = self._backend.abort_task(self.id, message=message)

    def mark_completed(self, status_message: str | None = None) -> None:
        """Mark the task of this process (or a draft) completed now."""
        self._finish(TaskStatus.completed, StatusReason.completed, status_message or "marked completed")

    def mark_failed(self, status_reason: str | None = None, status_message: str | None = None) -> None:
        """Mark the task of this process (or a draft) failed now."""
        self._finish(TaskStatus.failed, status_reason or "marked_failed", status_message or "marked failed")

    def _finish(self, status: TaskStatus, reason: str, message: str) -> None:
        self.get_logger().flush()
        if lifecycle.is_watched(self):
            lifecycle.settle()
        self._record = self._backend.set_status(self.id, status, reason=reason, message=message)

    def close(self) -> None:
        """Flush reports; a local `Task.init` task is marked completed now instead of at exit."""
        self.get_logger().flush()
        if lifecycle.is_watched(self):
            lifecycle.finish(TaskStatus.completed, StatusReason.completed, "closed")
        if Task._current is self:
            Task._current = None

    def execute_remotely(
        self, queue_name: str | None = None, clone: bool = False, exit_process: bool = True
    ) -> Task | None:
        """Hand this script's task to an agent.

        Under an agent this does nothing (returns None) and the step goes on. Locally,
        what the script recorded so far (code, packages, connected parameters) becomes
        a template: the task is reset to created so it can be cloned, then enqueued on
        `queue_name` if given (with `clone=True` a clone is enqueued and this task stays
        a draft), and with `exit_process` the process exits with code 0 right away.
        Returns the task that was (or can be) enqueued.
        """
        if self.running_remotely():
            return None
        if not lifecycle.is_watched(self):
            raise RuntimeError(
                f"execute_remotely: task {self.id} is not the task this script started with Task.init"
            )
        self.get_logger().flush()
        lifecycle.settle()
        self._backend.set_status(self.id, TaskStatus.stopped, reason=StatusReason.execute_remotely,
                                 message="recorded as a template by execute_remotely()")
        self._record = self._backend.reset_task(self.id)
        target = Task.clone(self) if clone else self
        if queue_name:
            target._record = self._backend.enqueue(target.id, queue_name)
        if exit_process:
            where = f"enqueued on {queue_name!r}" if queue_name else "saved as a draft"
            print(f"conveyor: task {target.id} {where}; exiting (execute_remotely)", flush=True)
            sys.exit(0)
        return target

    # ------------------------------------------------------------ outputs
    def upload_artifact(
        self,
        name: str,
        artifact_object: Any,
        metadata: Mapping[str, Any] | None = None,
        delete_after_upload: bool = False,
        auto_pickle: bool = True,
        preview: Any = None,
        wait_on_upload: bool = False,
        serialization_function: Callable[[Any], bytes | bytearray] | None = None,
    ) -> bool:
        """Store `artifact_object` as the artifact `name` of this task (replacing one of
        the same name) and return True once it is stored.

        See `controller.sdk.artifacts` for what each kind of object becomes. The upload
        is synchronous whatever `wait_on_upload` says. Errors raise (ValueError for a
        bad name or an object that cannot be serialized) instead of returning False.
        """
        upload_artifact(
            self._backend, self.id, self.project, self.output_uri, name, artifact_object,
            metadata=metadata, delete_after_upload=delete_after_upload, auto_pickle=auto_pickle,
            preview=preview, serialization_function=serialization_function,
        )
        return True

    @property
    def artifacts(self) -> Artifacts:
        """The task's artifacts by name, read from the store now."""
        self.reload()
        return Artifacts(self.id, self._record.artifacts)

    @property
    def models(self) -> dict[str, ModelList]:
        """{"input": [...], "output": [...]} models of the task, read from the store now;
        `task.models["output"][-1].url` is the last output model's URL."""
        from controller.sdk.output_model import ModelEntry, ModelList

        self.reload()
        result = {"input": ModelList(), "output": ModelList()}
        for kind, items in self._record.models.items():
            result[kind] = ModelList(ModelEntry(m) for m in items)
        return result

    def get_logger(self) -> Logger:
        """The Logger reporting to this task."""
        return Logger._for_task(self)


def _time_limit(seconds: float | None) -> float | None:
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        raise ValueError(f"time limit: a number of seconds > 0 (or None), got {seconds!r}")
    return float(seconds)


def task_changes_for_create(
    *,
    project_name: str | None = None,
    task_name: str | None = None,
    task_type: TaskType | str | None = None,
    repo: str | None = None,
    branch: str | None = None,
    commit: str | None = None,
    script: str | None = None,
    working_directory: str | None = None,
    packages: Sequence[str] | bool | None = None,
    requirements_file: str | os.PathLike[str] | None = None,
    docker: str | None = None,
    docker_args: str | None = None,
    docker_bash_setup_script: str | None = None,
    argparse_args: Sequence[tuple[str, Any]] | None = None,
    force_single_script_file: bool = False,
    module: str | None = None,
    time_limit_s: float | None = None,
    based_on_a_task: bool = False,
) -> dict[str, Any]:
    """The task fields `Task.create` (and `controller tasks create`) set, as a spec for
    `Backend.create_task` (or, `based_on_a_task`, as changes to a clone for `edit_task`).

    Reads the local script, repository and requirements file; ValueError (or
    FileNotFoundError) names a missing or contradictory argument.
    """
    from controller.sdk import script_info

    if script and module:
        raise ValueError("Task.create: give a script or a module, not both")
    changes: dict[str, Any] = {}
    local_script: Path | None = None
    if module:
        if repo:
            fields, _ = script_info.script_for_create(repo, branch, commit, ".", working_directory)
        else:
            fields = {"working_dir": Path(working_directory or ".").as_posix()}
        fields["entry_point"] = f"-m {module}"
        changes["script"] = fields
    elif script or repo:
        fields, local_script = script_info.script_for_create(
            repo, branch, commit, script, working_directory, single_file=force_single_script_file
        )
        changes["script"] = fields
    elif not based_on_a_task:
        raise ValueError("Task.create: give a script (with a repo, or a local file), a module, or base_task_id")
    if argparse_args and "script" in changes:
        changes["script"]["entry_point"] += " " + " ".join(_argparse_words(argparse_args))
    if packages is True:
        if "script" in changes:
            changes["packages"] = script_info.detect_packages(local_script) if local_script else []
    elif isinstance(packages, Sequence) and not isinstance(packages, str):
        changes["packages"] = list(packages)
    if requirements_file:
        req = Path(requirements_file).expanduser()
        if req.is_absolute() and req.is_file():
            changes["packages"] = [
                line.strip() for line in req.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
        else:
            changes.setdefault("script", {})["requirements_file"] = str(requirements_file)
    container = {k: v for k, v in (("image", docker), ("arguments", docker_args),
                                   ("setup_shell_script", docker_bash_setup_script)) if v}
    if container:
        changes["container"] = container
    if argparse_args:
        changes["hyperparams"] = {"Args": {str(k).lstrip("-"): params.to_stored(v) for k, v in argparse_args}}
    if time_limit_s is not None:
        changes["execution"] = {"time_limit_s": _time_limit(time_limit_s)}
    if task_name:
        changes["name"] = task_name
    if project_name is not None:
        changes["project"] = project_name
    if task_type is not None:
        changes["type"] = _task_type(task_type)
    if not based_on_a_task:
        changes.setdefault("name", Path(script or "task").stem if not module else module.split()[0])
        changes.setdefault("type", _task_type(task_type))
    return changes


def _argparse_words(pairs: Sequence[tuple[str, Any]]) -> list[str]:
    import shlex

    words = []
    for key, value in pairs:
        flag = "--" + str(key).lstrip("-")
        words.append(shlex.quote(flag if value is None or value is True else f"{flag}={value}"))
    return words

