"""Why a task's container could not be set up (each fails the task: setup_failed).

Kept apart from `agent.environments.docker` so the executor can catch them without
importing the docker SDK for agents that never run containers.
"""

from __future__ import annotations

from controller.errors import ConveyorError


class ContainerError(ConveyorError):
    """A task's container could not be prepared, started or supervised."""

    code = "container_failed"


class DockerUnavailableError(ContainerError):
    """No docker engine answers."""

    code = "docker_unavailable"


class ImageUnavailableError(ContainerError):
    """The image is neither present locally nor pullable."""

    code = "image_unavailable"


class DockerArgsError(ContainerError):
    """A docker_args string the agent will not run (unknown, malformed or refused)."""

    code = "invalid_docker_args"
