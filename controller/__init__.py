"""Conveyor control plane: task store, queues, HTTP API, SDK and pipelines."""

__version__ = "0.1.0"
