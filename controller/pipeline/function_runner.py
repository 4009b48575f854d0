"""Runs inside a function step: read the kwargs, call the function, store the returns.

Imported by the generated step script (see `function_step.render_step_code`), in the
step's own environment, where the Conveyor SDK is importable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from controller.pipeline.function_step import OBJECT_MODULES_KEY, object_modules
from controller.pipeline.launch import KWARGS_ARTIFACTS_SECTION, KWARGS_SECTION


def run_function_step(
    function: Callable[..., Any],
    return_names: Sequence[str],
    *,
    serialization_function: Callable[[Any], bytes] | None = None,
    deserialization_function: Callable[[bytes], Any] | None = None,
) -> Any:
    """Call `function` with the step's kwargs; upload its results as artifacts."""
    from controller import Task
    from controller.sdk.artifacts import Artifacts

    if not os.environ.get("CONVEYOR_TASK_ID"):
        raise RuntimeError("a function step runs under an agent (CONVEYOR_TASK_ID is not set)")
    task = Task.init()
    record = task.data
    kwargs = dict(record.hyperparams.get(KWARGS_SECTION, {}))
    sources: dict[str, Artifacts] = {}  # each source task read once (its record as fetched)
    for name, marker in (record.hyperparams.get(KWARGS_ARTIFACTS_SECTION) or {}).items():
        source_id, _, artifact_name = str(marker).partition(".")
        if source_id not in sources:
            source = Task.get_task(task_id=source_id)
            sources[source_id] = Artifacts(source.id, source.data.artifacts)
        kwargs[name] = sources[source_id][artifact_name].get(deserialization_function=deserialization_function)
    result = function(**kwargs)
    if not return_names:
        return result
    values = [result] if len(return_names) == 1 else list(result)
    if len(values) != len(return_names):
        raise ValueError(
            f"{function.__name__}() returned {len(values)} value(s) for function_return {list(return_names)}"
        )
    for name, value in zip(return_names, values, strict=True):
        task.upload_artifact(name, value, metadata={OBJECT_MODULES_KEY: object_modules(value)},
                             serialization_function=serialization_function)
    return result
