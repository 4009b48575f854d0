"""SQL persistence of the control plane: SQLite (embedded default) and PostgreSQL."""

from controller.store.sql import SqlBackend

__all__ = ["SqlBackend"]
