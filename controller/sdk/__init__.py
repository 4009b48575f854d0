"""The step SDK: what code running in a step imports (`from controller import Task`).

Heavy libraries (pandas, numpy, PIL, fsspec, requests) are imported only when an
artifact or a transfer needs them, so importing the SDK stays cheap.
"""

from controller.sdk.logger import Logger
from controller.sdk.output_model import OutputModel
from controller.sdk.storage import StorageManager
from controller.sdk.task import Task, TaskNotFoundError, TaskTypes

__all__ = ["Logger", "OutputModel", "StorageManager", "Task", "TaskNotFoundError", "TaskTypes"]
