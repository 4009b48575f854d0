"""What a step's process pays for (issue 17): it imports only what it uses (each import
runs in a fresh interpreter and the test reads which modules it loaded), and under an
agent it ends without the interpreter's final garbage collection walk, still running
every exit handler and flushing its reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The pipeline engine: a function step never needs it.
PIPELINE_ENGINE = ("controller.pipeline.controller", "controller.pipeline.runner",
                   "controller.pipeline.dag", "controller.pipeline.decorator")


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    return set(json.loads(out.stdout))


def test_importing_the_sdk_loads_no_records_store_or_pipeline():
    loaded = loaded_after("import controller, controller.sdk")
    for heavy in ("pydantic", "sqlalchemy", "controller.models", "controller.store", "controller.pipeline"):
        assert heavy not in loaded


def test_the_task_class_loads_neither_a_store_nor_the_pipeline_engine():
    loaded = loaded_after("from controller import Task")
    assert "controller.sdk.task" in loaded
    for heavy in ("sqlalchemy", "controller.store", "controller.client", "requests", "controller.sdk.script_info",
                  "controller.sdk.output_model", "urllib.request", "argparse", *PIPELINE_ENGINE):
        assert heavy not in loaded


def test_a_function_step_imports_its_runner_without_the_pipeline_engine():
    loaded = loaded_after(
        "from controller.pipeline.function_runner import run_function_step\nfrom controller import Task"
    )
    assert "controller.pipeline.function_runner" in loaded
    for heavy in (*PIPELINE_ENGINE, "controller.sdk.script_info", "urllib.request", "concurrent.futures"):
        assert heavy not in loaded


@pytest.mark.parametrize("name", ["Task", "Logger", "StorageManager", "TaskTypes", "OutputModel", "TaskNotFoundError"])
def test_lazy_sdk_names_are_the_real_classes(name):
    import controller
    import controller.sdk

    module = {"Logger": "logger", "StorageManager": "storage", "OutputModel": "output_model"}.get(name, "task")
    expected = getattr(__import__(f"controller.sdk.{module}", fromlist=[name]), name)
    assert getattr(controller.sdk, name) is expected
    if name != "TaskNotFoundError":
        assert getattr(controller, name) is expected
    assert name in dir(controller.sdk)


def test_pipeline_names_still_import_from_the_package():
    from controller.pipeline import (
        Node,
        PipelineController,
        PipelineDecorator,
        PipelineDefinitionError,
        PipelineStepError,
    )
    from controller.pipeline.controller import PipelineController as Defined

    assert PipelineController is Defined
    assert {Node, PipelineDecorator, PipelineDefinitionError, PipelineStepError}


def test_an_unknown_name_is_an_attribute_error():
    import controller.pipeline
    import controller.sdk

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        controller.sdk.Nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        controller.pipeline.Nope  # noqa: B018


def test_a_step_under_an_agent_flushes_its_reports_and_runs_every_exit_handler(tmp_path: Path, sqlite_url: str):
    from controller.connect import backend_from_url

    backend = backend_from_url(sqlite_url)
    task = backend.create_task({"name": "step"})
    script = tmp_path / "step.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, gc
        from pathlib import Path

        def record(name):
            Path({str(tmp_path)!r}, name).write_text(str(gc.get_freeze_count()))

        atexit.register(record, "registered-before-init")  # runs last, after the freeze
        from controller import Task

        task = Task.init()
        task.get_logger().report_scalar("loss", "train", 0.5, 3)
        task.get_logger().report_text("last words")
        atexit.register(record, "registered-after-init")  # runs first, before the freeze
    """))
    env = {**os.environ, "CONVEYOR_API": sqlite_url, "CONVEYOR_TASK_ID": task.id,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert [(s.title, s.series, s.iteration, s.value) for s in backend.get_scalars(task.id)] == [("loss", "train", 3, 0.5)]
    assert [line.line for line in backend.get_log(task.id)] == ["last words"]
    assert (tmp_path / "registered-after-init").read_text() == "0"
    assert int((tmp_path / "registered-before-init").read_text()) > 0, "objects alive at exit were frozen"
