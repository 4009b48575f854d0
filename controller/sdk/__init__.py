"""The step SDK: what code running in a step imports (`from controller import Task`).

A step imports only what it uses: the names below are loaded on first use (PEP 562),
so `import controller.sdk` costs nothing, `Task` loads the task module alone, and the
store or HTTP client (with the pydantic records they return) is loaded when a task is
first fetched (`Task.init()`, `Task.get_task()`). Heavy libraries (pandas, numpy, PIL,
fsspec, requests) are imported only when an artifact or a transfer needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller.sdk.logger import Logger
    from controller.sdk.output_model import OutputModel
    from controller.sdk.storage import StorageManager
    from controller.sdk.task import Task, TaskNotFoundError, TaskTypes

#: Exported name → the module defining it.
_EXPORTS = {
    "Logger": "controller.sdk.logger",
    "OutputModel": "controller.sdk.output_model",
    "StorageManager": "controller.sdk.storage",
    "Task": "controller.sdk.task",
    "TaskNotFoundError": "controller.sdk.task",
    "TaskTypes": "controller.sdk.task",
}

__all__ = ["Logger", "OutputModel", "StorageManager", "Task", "TaskNotFoundError", "TaskTypes"]


def __getattr__(name: str) -> Any:
    """Load an exported name from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'controller.sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
