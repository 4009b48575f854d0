"""Conveyor control plane: task store, queues, HTTP API, SDK and pipelines.

The step SDK is exported lazily (`from controller import Task, Logger, StorageManager,
TaskTypes, OutputModel`), and so are the pipeline classes (`PipelineController`,
`PipelineDecorator`): importing `controller` alone loads neither.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_SDK_NAMES = frozenset({"Task", "Logger", "StorageManager", "TaskTypes", "OutputModel"})
_PIPELINE_NAMES = frozenset({"PipelineController", "PipelineDecorator"})
__all__ = ["__version__", *sorted(_SDK_NAMES | _PIPELINE_NAMES)]


def __getattr__(name: str) -> Any:
    if name in _SDK_NAMES:
        from controller import sdk

        return getattr(sdk, name)
    if name in _PIPELINE_NAMES:
        from controller import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'controller' has no attribute {name!r}")
