"""Environments the agent runs steps in: cached virtualenvs (`venv`), containers (`docker`)."""

from agent.environments.venv import (
    DEFAULT_DISK_BUDGET_BYTES,
    EnvironmentBuildError,
    VenvResult,
    ensure_venv,
    normalize_packages,
    venv_key,
)

__all__ = [
    "DEFAULT_DISK_BUDGET_BYTES",
    "EnvironmentBuildError",
    "VenvResult",
    "ensure_venv",
    "normalize_packages",
    "venv_key",
]
