"""Pipelines: PipelineController (DAGs of tasks and functions) and its engine."""

from controller.pipeline.controller import PipelineController
from controller.pipeline.dag import PipelineDefinitionError
from controller.pipeline.node import Node

__all__ = ["Node", "PipelineController", "PipelineDefinitionError"]
