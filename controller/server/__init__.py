"""The Conveyor HTTP API server (`controller serve`)."""

from controller.server.app import create_app, serve

__all__ = ["create_app", "serve"]
