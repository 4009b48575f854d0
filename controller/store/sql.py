"""SqlBackend: the Backend straight on SQLite or PostgreSQL (SQLAlchemy Core).

One code path serves both databases. The operations are grouped by concept, each in
its module: tasks and their status changes (`tasks`), queues and claims (`queues`),
workers, heartbeats and leases (`workers`), logs and scalars (`logs`), on the common
ground of `core` (connections, the one status-change writer, the notifier).
"""

from __future__ import annotations

from controller.store.logs import LogOperations
from controller.store.queues import QueueOperations
from controller.store.tasks import TaskOperations
from controller.store.workers import WorkerOperations


class SqlBackend(TaskOperations, QueueOperations, WorkerOperations, LogOperations):
    """The task store on a database URL (`sqlite:///file.db` or `postgresql://...`)."""
