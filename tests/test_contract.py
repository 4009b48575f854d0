"""The Backend contract: the same behaviour over SQLite, PostgreSQL and HTTP.

Every test runs once per transport (see the `backend` fixture in conftest.py).
"""

from __future__ import annotations

import math
import threading
import time

import pytest

from controller.backend import Backend
from controller.errors import (
    ConflictError,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
)
from controller.models import StatusReason, TaskStatus

FULL_SPEC = {
    "name": "train",
    "project": "examples",
    "type": "training",
    "tags": ["nightly", "gpu"],
    "comment": "a full record",
    "script": {
        "repository": "https://example.com/repo.git",
        "branch": "main",
        "commit": "abc123",
        "entry_point": "train.py --epochs 3",
        "working_dir": "src",
        "diff": "--- a\n+++ b\n",
    },
    "packages": ["numpy==1.26.4", "pandas"],
    "container": {"image": "python:3.11", "arguments": "-e A=1", "setup_shell_script": "echo hi"},
    "hyperparams": {"General": {"lr": 0.1, "epochs": 3, "flag": True, "name": "x", "none": None}},
    "configuration": {"config": {"a": [1, 2]}, "notes": "text"},
    "execution": {"queue": "default", "priority": 5, "time_limit_s": 60},
}


def _task_count(backend: Backend) -> int:
    return len(backend.query_tasks(limit=10_000))


def _running(backend: Backend, worker: str = "w1", **spec: object) -> str:
    task = backend.create_task({"name": "t", **spec})
    backend.enqueue(task.id)
    claimed = backend.claim(["default"], worker)
    assert claimed is not None and claimed.id == task.id
    return task.id


# --------------------------------------------------------------------------- tasks
def test_create_task_keeps_every_field(backend: Backend) -> None:
    task = backend.create_task(FULL_SPEC)
    got = backend.get_task(task.id)
    assert got.status == TaskStatus.created
    assert got.name == "train" and got.project == "examples" and got.type.value == "training"
    assert got.tags == ["nightly", "gpu"]
    assert got.script.commit == "abc123" and got.script.working_dir == "src"
    assert got.packages == ["numpy==1.26.4", "pandas"]
    assert got.container.image == "python:3.11"
    assert got.hyperparams["General"] == {"lr": 0.1, "epochs": 3, "flag": True, "name": "x", "none": None}
    assert got.configuration == {"config": {"a": [1, 2]}, "notes": "text"}
    assert got.execution.priority == 5 and got.execution.time_limit_s == 60
    assert got.created_at <= time.time()
    assert [h.status for h in got.status_history] == [TaskStatus.created]


def test_get_unknown_task_names_the_id(backend: Backend) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        backend.get_task("nope")


def test_query_filters_by_project_name_status_tags_parent(backend: Backend) -> None:
    parent = backend.create_task({"name": "pipe", "project": "p"})
    a = backend.create_task({"name": "a", "project": "p", "tags": ["x", "y"], "parent": parent.id})
    b = backend.create_task({"name": "b", "project": "p", "tags": ["x"]})
    backend.create_task({"name": "a", "project": "other"})
    backend.enqueue(b.id)
    assert {t.id for t in backend.query_tasks(project="p")} == {parent.id, a.id, b.id}
    assert [t.id for t in backend.query_tasks(project="p", name="a")] == [a.id]
    assert [t.id for t in backend.query_tasks(status=["queued"])] == [b.id]
    assert {t.id for t in backend.query_tasks(tags=["x"])} == {a.id, b.id}
    assert [t.id for t in backend.query_tasks(tags=["x", "y"])] == [a.id]
    assert [t.id for t in backend.query_tasks(parent=parent.id)] == [a.id]
    newest_first = backend.query_tasks(project="p")
    assert newest_first[0].id == b.id


def test_edit_changes_a_created_task_and_merges_sections(backend: Backend) -> None:
    task = backend.create_task(FULL_SPEC)
    edited = backend.edit_task(
        task.id, {"hyperparams": {"General": {"lr": 0.5}, "Extra": {"k": "v"}}, "script": {"branch": "dev"}}
    )
    assert edited.hyperparams["General"]["lr"] == 0.5
    assert edited.hyperparams["General"]["epochs"] == 3
    assert edited.hyperparams["Extra"] == {"k": "v"}
    assert edited.script.branch == "dev" and edited.script.commit == "abc123"
    assert backend.get_task(task.id).script.branch == "dev"


def test_edit_is_refused_unless_created_and_changes_nothing(backend: Backend) -> None:
    task_id = _running(backend)
    with pytest.raises(ConflictError, match="in_progress"):
        backend.edit_task(task_id, {"name": "renamed"})
    assert backend.get_task(task_id).name == "t"
    forced = backend.edit_task(task_id, {"runtime": {"commit_used": "deadbeef"}}, force=True)
    assert forced.runtime.commit_used == "deadbeef"
    assert forced.status == TaskStatus.in_progress


def test_concurrent_edits_of_one_task_are_all_kept(backend: Backend, backend_url: str) -> None:
    """Edits from several clients at once each merge into what the others wrote (none
    is lost), while the task's status changes meanwhile."""
    from controller.connect import backend_from_url

    task = backend.create_task({"name": "t"})
    clients = [backend_from_url(backend_url) for _ in range(3)]
    errors: list[BaseException] = []

    def edit(n: int) -> None:
        try:
            for i in range(10):
                clients[n].edit_task(task.id, {"hyperparams": {f"c{n}": {f"k{i}": i}}}, force=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=edit, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    backend.enqueue(task.id)
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    assert errors == []
    record = backend.get_task(task.id)
    assert record.status == TaskStatus.queued
    assert {s: len(p) for s, p in record.hyperparams.items() if s.startswith("c")} == {"c0": 10, "c1": 10, "c2": 10}


def test_edit_rejects_unknown_and_invalid_fields(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    with pytest.raises(InvalidInputError, match="status"):
        backend.edit_task(task.id, {"status": "completed"})
    with pytest.raises(InvalidInputError, match="name"):
        backend.edit_task(task.id, {"name": "x" * 10_000})
    with pytest.raises(InvalidInputError, match="priority"):
        backend.edit_task(task.id, {"execution": {"priority": "high"}})
    again = backend.get_task(task.id)
    assert again.name == "t" and again.execution.priority == 0


def test_clone_copies_definition_with_new_id(backend: Backend) -> None:
    parent = backend.create_task({"name": "pipe"})
    source = backend.create_task({**FULL_SPEC, "parent": parent.id})
    source_id = _running(backend)  # a running task can be cloned too
    clone = backend.clone_task(source.id)
    assert clone.id != source.id and clone.status == TaskStatus.created
    assert clone.parent == parent.id and clone.hyperparams == source.hyperparams
    assert clone.script == source.script and clone.tags == source.tags
    renamed = backend.clone_task(source.id, name="step 2", parent=None)
    assert renamed.name == "step 2" and renamed.parent is None
    other = backend.clone_task(source_id, parent=parent.id)
    assert other.parent == parent.id and other.runtime.attempt == 0


def test_delete_removes_task_log_and_scalars(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    backend.append_log(task.id, ["line"])
    backend.report_scalars(task.id, [{"title": "loss", "series": "train", "value": 1.0}])
    backend.delete_task(task.id)
    with pytest.raises(NotFoundError):
        backend.get_task(task.id)
    with pytest.raises(NotFoundError):
        backend.get_log(task.id)


def test_delete_of_a_running_task_needs_force(backend: Backend) -> None:
    task_id = _running(backend)
    with pytest.raises(ConflictError):
        backend.delete_task(task_id)
    backend.delete_task(task_id, force=True)
    assert _task_count(backend) == 0


def test_delete_of_a_pipeline_takes_its_steps_along(backend: Backend) -> None:
    pipeline = backend.create_task({"name": "p", "type": "controller"})
    steps = [backend.create_task({"name": f"s{i}", "parent": pipeline.id}) for i in range(2)]
    backend.append_log(steps[0].id, ["a step's line"])
    other = backend.create_task({"name": "not a step"})
    deleted = backend.delete_task(pipeline.id)
    assert [r.id for r in deleted] == [steps[0].id, steps[1].id, pipeline.id]
    for gone in [*steps, pipeline]:
        with pytest.raises(NotFoundError):
            backend.get_task(gone.id)
    with pytest.raises(NotFoundError):
        backend.get_log(steps[0].id)
    assert backend.get_task(other.id).name == "not a step"


def test_delete_of_a_pipeline_with_a_running_step_needs_force(backend: Backend) -> None:
    pipeline = backend.create_task({"name": "p", "type": "controller"})
    step_id = _running(backend, parent=pipeline.id)
    with pytest.raises(ConflictError) as refused:
        backend.delete_task(pipeline.id)
    assert step_id in refused.value.message and "in_progress" in refused.value.message
    assert backend.get_task(pipeline.id).id == pipeline.id  # nothing deleted
    assert backend.get_task(step_id).status == TaskStatus.in_progress
    assert len(backend.delete_task(pipeline.id, force=True)) == 2
    assert _task_count(backend) == 0


# ----------------------------------------------------------------------- statuses
def test_status_follows_the_legal_path(backend: Backend) -> None:
    task_id = _running(backend)
    done = backend.set_status(task_id, "completed", reason="completed", message="exit 0", worker_id="w1")
    assert done.status == TaskStatus.completed and done.finished_at is not None
    assert done.lease_expires_at is None
    history = [h.status.value for h in backend.get_task(task_id).status_history]
    assert history == ["created", "queued", "in_progress", "completed"]


def test_illegal_transition_names_both_statuses_and_changes_nothing(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    with pytest.raises(IllegalTransitionError) as info:
        backend.set_status(task.id, "completed")
    assert "created" in str(info.value) and "completed" in str(info.value)
    assert info.value.current == "created" and info.value.requested == "completed"
    assert backend.get_task(task.id).status == TaskStatus.created


def test_unknown_status_is_invalid_input(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    with pytest.raises(InvalidInputError, match="status"):
        backend.set_status(task.id, "exploded")


def test_only_the_holding_worker_may_report(backend: Backend) -> None:
    task_id = _running(backend, worker="w1")
    with pytest.raises(ConflictError, match="w1"):
        backend.set_status(task_id, "completed", worker_id="w2")
    assert backend.get_task(task_id).status == TaskStatus.in_progress


def test_rerun_of_a_finished_task_counts_attempts(backend: Backend) -> None:
    task_id = _running(backend)
    backend.set_status(task_id, "failed", reason="exit_code", message="exited with code 1")
    again = backend.enqueue(task_id)
    assert again.status == TaskStatus.queued
    claimed = backend.claim(["default"], "w2")
    assert claimed.id == task_id and claimed.runtime.attempt == 2 and claimed.runtime.worker == "w2"


def test_reset_clears_outputs(backend: Backend) -> None:
    task_id = _running(backend)
    backend.append_log(task_id, ["x"])
    backend.set_status(task_id, "completed")
    reset = backend.reset_task(task_id)
    assert reset.status == TaskStatus.created and reset.runtime.worker == ""
    assert backend.get_log(task_id) == []
    with pytest.raises(IllegalTransitionError):
        backend.reset_task(_running(backend))


def test_status_created_never_resets_a_finished_task(backend: Backend) -> None:
    task_id = _running(backend)
    backend.append_log(task_id, ["kept"])
    backend.report_scalars(task_id, [{"title": "loss", "series": "train", "value": 0.5}])
    backend.set_status(task_id, "completed")
    with pytest.raises(IllegalTransitionError) as info:
        backend.set_status(task_id, "created")
    assert info.value.current == "completed" and info.value.requested == "created"
    assert backend.get_task(task_id).status == TaskStatus.completed
    assert [line.line for line in backend.get_log(task_id)] == ["kept"]
    assert len(backend.get_scalars(task_id)) == 1


def test_status_created_takes_a_queued_task_off_its_queue(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    backend.enqueue(task.id)
    assert backend.set_status(task.id, "created").status == TaskStatus.created
    assert backend.queue_length("default") == 0


# ------------------------------------------------------------------ final reports
def _history(backend: Backend, task_id: str) -> list[str]:
    return [h.status.value for h in backend.get_task(task_id).status_history]


def _lines(backend: Backend, task_id: str) -> list[str]:
    return [x.line for x in backend.get_log(task_id)]


def test_final_report_writes_log_runtime_and_status(backend: Backend) -> None:
    task_id = _running(backend)
    backend.append_log(task_id, ["early"])
    backend.edit_task(task_id, {"runtime": {"commit_used": "abc123", "resources": {"gpu": 1}}}, force=True)
    done = backend.finish_task(
        task_id, "failed", reason="exit_code", message="exited with code 3", worker_id="w1",
        runtime={"exit_code": 3, "duration_s": 1.5},
        log_lines=["out", {"line": "Traceback", "stream": "stderr", "timestamp": 2.5}],
        log_batch_id="last-chunk",
    )
    assert done.status == TaskStatus.failed and done.finished_at is not None
    assert done.status_reason == "exit_code" and done.status_message == "exited with code 3"
    assert done.lease_expires_at is None
    got = backend.get_task(task_id)
    assert got.runtime.exit_code == 3 and got.runtime.duration_s == 1.5  # merged into what was there
    assert got.runtime.commit_used == "abc123" and got.runtime.resources == {"gpu": 1}
    assert got.runtime.worker == "w1" and got.runtime.attempt == 1
    lines = backend.get_log(task_id)
    assert [(x.n, x.line, x.stream) for x in lines] == [
        (0, "early", "stdout"), (1, "out", "stdout"), (2, "Traceback", "stderr")
    ]
    assert lines[2].timestamp == 2.5
    assert _history(backend, task_id) == ["created", "queued", "in_progress", "failed"]


def test_final_report_without_lines_or_runtime_is_a_status_report(backend: Backend) -> None:
    task_id = _running(backend)
    done = backend.finish_task(task_id, TaskStatus.completed, worker_id="w1")
    assert done.status == TaskStatus.completed and done.status_reason == "completed"
    assert backend.get_log(task_id) == [] and backend.get_task(task_id).runtime.exit_code is None


@pytest.mark.parametrize("case", ["not running", "other worker", "finished", "lease expired"])
def test_refused_final_report_writes_nothing(backend: Backend, case: str) -> None:
    if case == "not running":
        task_id, error = backend.create_task({"name": "t"}).id, IllegalTransitionError
        report = {"status": "completed"}
    elif case == "other worker":
        task_id, error = _running(backend, worker="w1"), ConflictError
        report = {"status": "completed", "worker_id": "w2"}
    elif case == "finished":
        task_id, error = _running(backend), IllegalTransitionError
        backend.set_status(task_id, "stopped", reason="aborted", message="aborted", worker_id="w1")
        report = {"status": "completed", "worker_id": "w1"}
    else:
        task = backend.create_task({"name": "t"})
        backend.enqueue(task.id)
        backend.claim(["default"], "lost-host:3", lease_s=0.2)
        time.sleep(0.4)
        assert backend.expire_leases() == [task.id]
        task_id, error = task.id, ConflictError
        report = {"status": "completed", "worker_id": "lost-host:3"}
    before = backend.get_task(task_id)
    with pytest.raises(error):
        backend.finish_task(task_id, **report, runtime={"exit_code": 0, "duration_s": 2.0},
                            log_lines=["late"], log_batch_id="refused-chunk")
    after = backend.get_task(task_id)
    assert after.status == before.status and after.status_history == before.status_history
    assert after.runtime == before.runtime and after.runtime.exit_code is None
    assert backend.get_log(task_id) == []
    # the chunk's batch id was not stored either: the same chunk can still be appended
    assert backend.append_log(task_id, ["late"], batch_id="refused-chunk") == 1


def test_retried_final_report_appends_its_lines_once(backend: Backend) -> None:
    task_id = _running(backend)
    report = dict(reason="completed", message="exit 0", worker_id="w1",
                  runtime={"exit_code": 0}, log_lines=["a", "b"], log_batch_id="final-1")
    first = backend.finish_task(task_id, "completed", **report)
    # the first answer was lost: the same report again is acknowledged, writing nothing
    again = backend.finish_task(task_id, "completed", **report)
    assert again.status == TaskStatus.completed and again.finished_at == first.finished_at
    assert _lines(backend, task_id) == ["a", "b"]
    assert _history(backend, task_id) == ["created", "queued", "in_progress", "completed"]
    # a different report (another outcome) of the finished task is refused as set_status is
    with pytest.raises(IllegalTransitionError):
        backend.finish_task(task_id, "failed", **{**report, "reason": "exit_code"})
    assert _lines(backend, task_id) == ["a", "b"]


def test_final_report_after_its_chunk_was_stored_appends_it_once(backend: Backend) -> None:
    """The chunk went out with append_log (the answer was lost, or an older agent sent
    it): the final report carrying it again adds the status only."""
    task_id = _running(backend)
    backend.append_log(task_id, ["a", "b"], batch_id="chunk-9")
    done = backend.finish_task(task_id, "completed", worker_id="w1", log_lines=["a", "b"], log_batch_id="chunk-9")
    assert done.status == TaskStatus.completed
    assert _lines(backend, task_id) == ["a", "b"]


def test_final_report_reported_twice_without_batch_id_is_refused_like_set_status(backend: Backend) -> None:
    task_id = _running(backend)
    backend.finish_task(task_id, "completed", worker_id="w1", log_lines=["a"])
    with pytest.raises(IllegalTransitionError):
        backend.finish_task(task_id, "completed", worker_id="w1", log_lines=["a"])
    assert _lines(backend, task_id) == ["a"]


@pytest.mark.parametrize(
    "report, field",
    [
        ({"status": "queued"}, "status"),
        ({"status": "in_progress"}, "status"),
        ({"status": "exploded"}, "status"),
        ({"status": "completed", "runtime": {"exit_code": "zero"}}, "runtime.exit_code"),
        ({"status": "completed", "runtime": [1]}, "runtime"),
        ({"status": "completed", "log_lines": [{"line": 1}]}, "log_lines.0.line"),
        ({"status": "completed", "log_lines": ["x"] * 10_001}, "log_lines"),
        ({"status": "completed", "log_batch_id": "has space"}, "log_batch_id"),
        ({"status": "completed", "worker_id": "has space"}, "worker_id"),
    ],
)
def test_bad_final_reports_are_refused_naming_the_field(backend: Backend, report: dict, field: str) -> None:
    task_id = _running(backend)
    with pytest.raises(InvalidInputError) as info:
        backend.finish_task(task_id, **{"log_lines": ["x"], "log_batch_id": "b1", **report})
    assert info.value.field == field, info.value
    assert backend.get_task(task_id).status == TaskStatus.in_progress
    assert backend.get_log(task_id) == []


def test_final_report_of_unknown_task_is_not_found(backend: Backend) -> None:
    with pytest.raises(NotFoundError):
        backend.finish_task("missing", "completed", log_lines=["x"], log_batch_id="b1")


# ------------------------------------------------------------------- logs, scalars
def test_log_lines_append_in_batches_and_read_by_offset_or_tail(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    assert backend.append_log(task.id, ["a", "b"]) == 2
    assert backend.append_log(task.id, [{"line": "c", "stream": "stderr", "timestamp": 1.5}]) == 3
    lines = backend.get_log(task.id)
    assert [(x.n, x.line, x.stream) for x in lines] == [(0, "a", "stdout"), (1, "b", "stdout"), (2, "c", "stderr")]
    assert lines[2].timestamp == 1.5
    assert [x.line for x in backend.get_log(task.id, offset=1)] == ["b", "c"]
    assert [x.line for x in backend.get_log(task.id, offset=1, limit=1)] == ["b"]
    assert [x.line for x in backend.get_log(task.id, tail=2)] == ["b", "c"]
    long_line = "y" * 100_000
    backend.append_log(task.id, [long_line])
    assert backend.get_log(task.id, tail=1)[0].line == long_line


def test_log_chunk_resent_with_the_same_batch_id_is_appended_once(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    assert backend.append_log(task.id, ["a", "b"], batch_id="chunk-1") == 2
    assert backend.append_log(task.id, ["a", "b"], batch_id="chunk-1") == 2
    assert backend.append_log(task.id, ["c"], batch_id="chunk-2") == 3
    assert backend.append_log(task.id, ["a", "b"], batch_id="chunk-1") == 3
    assert [x.line for x in backend.get_log(task.id)] == ["a", "b", "c"]
    # the same id on another task is another chunk
    other = backend.create_task({"name": "u"})
    assert backend.append_log(other.id, ["z"], batch_id="chunk-1") == 1


def test_log_without_batch_id_appends_every_time(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    assert backend.append_log(task.id, ["a"]) == 1
    assert backend.append_log(task.id, ["a"]) == 2
    assert [x.line for x in backend.get_log(task.id)] == ["a", "a"]


def test_log_batch_ids_are_forgotten_with_the_log(backend: Backend) -> None:
    task_id = _running(backend)
    backend.append_log(task_id, ["x"], batch_id="b1")
    backend.set_status(task_id, "completed")
    backend.reset_task(task_id)
    assert backend.append_log(task_id, ["x"], batch_id="b1") == 1
    assert [x.line for x in backend.get_log(task_id)] == ["x"]


@pytest.mark.parametrize("batch_id", ["", "x" * 65, "has space", "a/b", "ok\n"])
def test_log_batch_id_must_be_short_and_plain(backend: Backend, batch_id: str) -> None:
    task = backend.create_task({"name": "t"})
    with pytest.raises(InvalidInputError):
        backend.append_log(task.id, ["x"], batch_id=batch_id)
    assert backend.get_log(task.id) == []
    assert backend.append_log(task.id, ["x"], batch_id="x" * 64) == 1


def test_log_with_batch_id_of_unknown_task_is_not_found(backend: Backend) -> None:
    with pytest.raises(NotFoundError):
        backend.append_log("missing", ["x"], batch_id="b1")


def test_log_of_unknown_task_is_not_found(backend: Backend) -> None:
    with pytest.raises(NotFoundError):
        backend.append_log("missing", ["x"])


def test_scalars_round_trip(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    backend.report_scalars(
        task.id,
        [{"title": "loss", "series": "train", "iteration": i, "value": 1.0 / (i + 1)} for i in range(3)]
        + [{"title": "acc", "series": "val", "iteration": 0, "value": 0.9}],
    )
    loss = backend.get_scalars(task.id, title="loss")
    assert [(s.iteration, s.value) for s in loss] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert len(backend.get_scalars(task.id)) == 4
    with pytest.raises(InvalidInputError, match="value"):
        backend.report_scalars(task.id, [{"title": "loss", "series": "train", "value": "high"}])
    assert len(backend.get_scalars(task.id)) == 4


def test_nan_and_infinite_scalars_are_kept(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    backend.report_scalars(task.id, [
        {"title": "loss", "series": "train", "iteration": 0, "value": float("nan")},
        {"title": "loss", "series": "train", "iteration": 1, "value": float("inf")},
    ])
    values = [s.value for s in backend.get_scalars(task.id)]
    assert math.isnan(values[0]) and values[1] == float("inf")


def test_out_of_range_numbers_are_invalid_input(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    with pytest.raises(InvalidInputError):
        backend.get_log(task.id, offset=2**70)
    with pytest.raises(InvalidInputError, match="iteration"):
        backend.report_scalars(task.id, [{"title": "a", "series": "b", "iteration": 2**70, "value": 1}])


# -------------------------------------------------------------------------- queues
def test_default_and_services_queues_exist(backend: Backend) -> None:
    assert {"default", "services"} <= {q.name for q in backend.list_queues()}


def test_queues_are_created_listed_and_deleted(backend: Backend) -> None:
    backend.create_queue("gpu")
    assert backend.get_queue("gpu").length == 0
    with pytest.raises(ConflictError, match="gpu"):
        backend.create_queue("gpu")
    backend.delete_queue("gpu")
    with pytest.raises(NotFoundError, match="gpu"):
        backend.get_queue("gpu")
    with pytest.raises(InvalidInputError, match="queue"):
        backend.create_queue("bad name with spaces")


def test_deleting_a_non_empty_queue_needs_force(backend: Backend) -> None:
    backend.create_queue("q1")
    task = backend.create_task({"name": "t"})
    backend.enqueue(task.id, "q1")
    with pytest.raises(ConflictError, match="1 task"):
        backend.delete_queue("q1")
    assert backend.get_queue("q1").length == 1
    backend.delete_queue("q1", force=True)
    assert backend.get_task(task.id).status == TaskStatus.created


def test_enqueue_orders_by_priority_then_age(backend: Backend) -> None:
    low = backend.create_task({"name": "low"})
    high = backend.create_task({"name": "high"})
    low2 = backend.create_task({"name": "low2"})
    for task, priority in ((low, 0), (high, 10), (low2, 0)):
        backend.enqueue(task.id, "default", priority=priority)
    assert [t.id for t in backend.queue_tasks("default")] == [high.id, low.id, low2.id]
    assert backend.queue_length("default") == 3
    info = backend.get_queue("default")
    assert info.oldest_queued_at is not None
    claimed = [backend.claim(["default"], "w").id for _ in range(3)]
    assert claimed == [high.id, low.id, low2.id]


def test_enqueue_uses_the_task_queue_and_refuses_unknown_queues(backend: Backend) -> None:
    task = backend.create_task({"name": "t", "execution": {"queue": "services"}})
    assert backend.enqueue(task.id).execution.queue == "services"
    other = backend.create_task({"name": "t2"})
    with pytest.raises(NotFoundError, match="nosuch"):
        backend.enqueue(other.id, "nosuch")
    assert backend.get_task(other.id).status == TaskStatus.created
    with pytest.raises(IllegalTransitionError):
        backend.enqueue(task.id)  # already queued


def test_enqueue_without_a_queue_uses_the_own_queue_or_default(backend: Backend) -> None:
    backend.create_queue("gpu")
    on_gpu = backend.create_task({"name": "g", "execution": {"queue": "gpu", "priority": 7}})
    plain = backend.create_task({"name": "p"})
    lost = backend.create_task({"name": "l", "execution": {"queue": "gone"}})

    queued = backend.enqueue(on_gpu.id)
    assert (queued.status, queued.execution.queue, queued.execution.priority) == ("queued", "gpu", 7)
    assert queued.status_message == "enqueued on gpu"
    assert backend.enqueue(plain.id).execution.queue == "default"
    with pytest.raises(NotFoundError, match="gone"):
        backend.enqueue(lost.id)
    assert backend.get_task(lost.id).status == TaskStatus.created
    with pytest.raises(NotFoundError):
        backend.enqueue("no-such-task")

    assert backend.claim(["gpu"], "w").id == on_gpu.id
    assert backend.claim(["default"], "w").id == plain.id


def test_dequeue_returns_the_task_to_created(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    backend.enqueue(task.id)
    assert backend.dequeue(task.id).status == TaskStatus.created
    assert backend.queue_length("default") == 0
    with pytest.raises(ConflictError):
        backend.dequeue(task.id)


def test_claim_takes_queues_in_the_given_order(backend: Backend) -> None:
    backend.create_queue("gpu")
    on_default = backend.create_task({"name": "d"})
    on_gpu = backend.create_task({"name": "g"})
    backend.enqueue(on_default.id, "default")
    backend.enqueue(on_gpu.id, "gpu")
    first = backend.claim(["gpu", "default"], "w")
    assert first.id == on_gpu.id and first.status == TaskStatus.in_progress
    assert first.runtime.worker == "w" and first.lease_expires_at > time.time()
    assert backend.claim(["gpu", "default"], "w").id == on_default.id
    assert backend.claim(["gpu", "default"], "w") is None


def test_claim_of_unknown_queue_is_not_found(backend: Backend) -> None:
    with pytest.raises(NotFoundError, match="nosuch"):
        backend.claim(["nosuch"], "w")


def test_claim_rejects_bad_arguments(backend: Backend) -> None:
    with pytest.raises(InvalidInputError):
        backend.claim([], "w")
    with pytest.raises(InvalidInputError):
        backend.claim(["default"], "bad worker id")
    with pytest.raises(InvalidInputError):
        backend.claim(["default"], "w", wait_s=-1)


def test_claim_waits_and_returns_none_when_nothing_comes(backend: Backend) -> None:
    started = time.monotonic()
    assert backend.claim(["default"], "w", wait_s=0.3) is None
    assert 0.25 <= time.monotonic() - started < 2.0


def test_claim_wakes_as_soon_as_a_task_is_enqueued(backend: Backend, backend_url: str) -> None:
    from controller.connect import backend_from_url

    producer = backend_from_url(backend_url)
    task = producer.create_task({"name": "t"})
    timer = threading.Timer(0.3, producer.enqueue, args=(task.id,))
    started = time.monotonic()
    timer.start()
    try:
        claimed = backend.claim(["default"], "w", wait_s=10)
    finally:
        timer.cancel()
        producer.close()
    assert claimed is not None and claimed.id == task.id
    assert time.monotonic() - started < 1.5


# -------------------------------------------------------------- workers and leases
def test_workers_register_heartbeat_and_unregister(backend: Backend) -> None:
    backend.register_worker("host:0", hostname="host", queues=["default"], slots=2)
    task_id = _running(backend, worker="host:0")
    reply = backend.heartbeat("host:0", resources={"cpu_percent": 12.5}, current_tasks=[task_id])
    assert reply.abort == []
    (worker,) = backend.list_workers()
    assert worker.id == "host:0" and worker.slots == 2 and worker.queues == ["default"]
    assert worker.current_tasks == [task_id] and worker.resources["cpu_percent"] == 12.5
    assert worker.last_seen >= worker.registered_at
    backend.unregister_worker("host:0")
    assert backend.list_workers() == []
    with pytest.raises(NotFoundError, match="host:0"):
        backend.heartbeat("host:0")


def test_heartbeat_extends_the_lease(backend: Backend) -> None:
    backend.register_worker("w1")
    task = backend.create_task({"name": "t"})
    backend.enqueue(task.id)
    backend.claim(["default"], "w1", lease_s=1.0)
    before = backend.get_task(task.id).lease_expires_at
    time.sleep(0.6)
    backend.heartbeat("w1", lease_s=1.0)
    time.sleep(0.6)
    assert backend.expire_leases() == []
    after = backend.get_task(task.id)
    assert after.status == TaskStatus.in_progress and after.lease_expires_at > before


def test_expired_lease_fails_the_task_naming_the_lost_worker(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    backend.enqueue(task.id)
    backend.claim(["default"], "lost-host:3", lease_s=0.2)
    time.sleep(0.4)
    assert backend.expire_leases() == [task.id]
    failed = backend.get_task(task.id)
    assert failed.status == TaskStatus.failed and failed.status_reason == "lease_expired"
    assert "lost-host:3" in failed.status_message
    with pytest.raises(ConflictError):  # the lost worker cannot overwrite the outcome
        backend.set_status(task.id, "completed", worker_id="lost-host:3")


def test_claim_sweeps_expired_leases(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    backend.enqueue(task.id)
    backend.claim(["default"], "gone", lease_s=0.1)
    time.sleep(1.2)  # past the lease and the sweep interval
    backend.claim(["default"], "other")
    assert backend.get_task(task.id).status == TaskStatus.failed


def test_abort_of_a_running_task_goes_through_stopping(backend: Backend) -> None:
    backend.register_worker("w1")
    task_id = _running(backend, worker="w1")
    assert backend.abort_task(task_id).status == TaskStatus.stopping
    reply = backend.heartbeat("w1", current_tasks=[task_id])
    assert reply.abort == [task_id]
    stopped = backend.set_status(task_id, "stopped", reason="aborted", message="aborted by user", worker_id="w1")
    assert stopped.status == TaskStatus.stopped
    assert backend.heartbeat("w1").abort == []


def test_heartbeat_tells_a_worker_to_drop_tasks_it_no_longer_holds(backend: Backend) -> None:
    backend.register_worker("w1")
    task_id = _running(backend, worker="w1")
    backend.set_status(task_id, "failed")
    assert backend.heartbeat("w1", current_tasks=[task_id]).abort == [task_id]


def test_a_heartbeat_ends_held_tasks_the_worker_no_longer_runs(backend: Backend) -> None:
    backend.register_worker("w1")
    kept, dropped = _running(backend, worker="w1"), _running(backend, worker="w1")
    # Claimed after the previous heartbeat: this one may have been taken before the
    # claims returned, so unlisted tasks are kept for now...
    assert backend.heartbeat("w1", current_tasks=[]).abort == []
    assert backend.get_task(dropped).status == TaskStatus.in_progress
    before = backend.get_task(kept).lease_expires_at
    time.sleep(0.05)
    # ... and ended at the next heartbeat that does not list them.
    assert backend.heartbeat("w1", current_tasks=[kept], lease_s=60).abort == []
    ended = backend.get_task(dropped)
    assert ended.status == TaskStatus.failed and ended.status_reason == "worker_restarted"
    assert "w1" in ended.status_message and "no longer runs" in ended.status_message
    running = backend.get_task(kept)
    assert running.status == TaskStatus.in_progress and running.lease_expires_at > before


def test_registering_again_ends_the_previous_runs_tasks(backend: Backend) -> None:
    backend.register_worker("host:0")
    running = _running(backend, worker="host:0")
    stopping = _running(backend, worker="host:0")
    backend.abort_task(stopping)
    other = _running(backend, worker="host:1")
    backend.register_worker("host:0")  # the agent restarted with the same id
    failed, stopped = backend.get_task(running), backend.get_task(stopping)
    assert (failed.status, failed.status_reason) == (TaskStatus.failed, "worker_restarted")
    assert (stopped.status, stopped.status_reason) == (TaskStatus.stopped, "worker_restarted")
    assert "registered again" in failed.status_message
    assert backend.get_task(other).status == TaskStatus.in_progress


def backend_sweeps_itself(backend: Backend) -> bool:
    """Whether a server in front of this backend sweeps expired leases on its own."""
    return backend.url.startswith(("http://", "https://"))


def test_a_lost_worker_is_reported_with_how_long_it_was_silent(backend: Backend) -> None:
    backend.register_worker("lost")
    task = backend.create_task({"name": "t"})
    backend.enqueue(task.id)
    backend.claim(["default"], "lost", lease_s=0.5)
    backend.heartbeat("lost", current_tasks=[task.id], lease_s=0.5)
    time.sleep(1.2)
    expired = backend.expire_leases()
    # over HTTP the server's own periodic sweep may have ended it first
    assert expired == [task.id] or (expired == [] and backend_sweeps_itself(backend)), expired
    lost = backend.get_task(task.id)
    assert lost.status == TaskStatus.failed and lost.status_reason == StatusReason.lease_expired
    message = lost.status_message
    silent_s = float(message.split("not heard from for ")[1].split(" s")[0])
    assert 1.0 <= silent_s < 5.0, message


def test_abort_of_a_queued_task_stops_it_at_once(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    backend.enqueue(task.id)
    stopped = backend.abort_task(task.id)
    assert stopped.status == TaskStatus.stopped and backend.queue_length("default") == 0
    with pytest.raises(IllegalTransitionError):
        backend.abort_task(task.id)


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "spec, field",
    [
        ({}, "name"),
        ({"name": 123}, "name"),
        ({"name": "x" * 300}, "name"),
        ({"name": "t", "tags": "not-a-list"}, "tags"),
        ({"name": "t", "tags": [f"t{i}" for i in range(100)]}, "tags"),
        ({"name": "t", "type": "weird"}, "type"),
        ({"name": "t", "execution": {"time_limit_s": -5}}, "time_limit_s"),
        ({"name": "t", "hyperparams": {"General": "flat"}}, "hyperparams"),
        ({"name": "t", "unknown_field": 1}, "unknown_field"),
        ({"name": "t", "parent": "no-such-parent"}, "no-such-parent"),
    ],
)
def test_bad_task_specs_are_refused_and_store_nothing(backend: Backend, spec: dict, field: str) -> None:
    with pytest.raises((InvalidInputError, NotFoundError), match=field):
        backend.create_task(spec)
    assert _task_count(backend) == 0


def test_bad_query_arguments_are_refused(backend: Backend) -> None:
    with pytest.raises(InvalidInputError, match="limit"):
        backend.query_tasks(limit=0)
    with pytest.raises(InvalidInputError, match="status"):
        backend.query_tasks(status=["sideways"])


# ------------------------------------------------------------ following statuses
def test_wait_for_status_change_returns_at_once_when_a_status_differs(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    backend.enqueue(task.id)
    changed = backend.wait_for_status_change({task.id: "created"}, wait_s=5)
    assert [t.id for t in changed] == [task.id] and changed[0].status == TaskStatus.queued
    assert backend.wait_for_status_change({task.id: "queued"}, wait_s=0) == []


def test_wait_for_status_change_wakes_when_a_step_moves(backend: Backend, backend_url: str) -> None:
    from controller.connect import backend_from_url

    other = backend_from_url(backend_url)
    task = backend.create_task({"name": "t"})
    timer = threading.Timer(0.3, other.enqueue, args=(task.id,))
    started = time.monotonic()
    timer.start()
    try:
        changed = backend.wait_for_status_change({task.id: "created"}, wait_s=10)
    finally:
        timer.cancel()
        other.close()
    assert [t.status for t in changed] == [TaskStatus.queued]
    assert time.monotonic() - started < 1.5


def test_wait_for_status_change_refuses_bad_input(backend: Backend) -> None:
    task = backend.create_task({"name": "t"})
    with pytest.raises(NotFoundError, match="ghost"):
        backend.wait_for_status_change({"ghost": "created"})
    with pytest.raises(InvalidInputError):
        backend.wait_for_status_change({task.id: "sideways"})
    with pytest.raises(InvalidInputError):
        backend.wait_for_status_change({})
