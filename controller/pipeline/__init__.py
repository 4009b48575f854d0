"""Pipelines: PipelineController (DAGs of tasks and functions), PipelineDecorator, the engine."""

from controller.pipeline.controller import PipelineController
from controller.pipeline.dag import PipelineDefinitionError
from controller.pipeline.decorator import PipelineDecorator
from controller.pipeline.lazy import PipelineStepError
from controller.pipeline.node import Node

__all__ = ["Node", "PipelineController", "PipelineDecorator", "PipelineDefinitionError", "PipelineStepError"]
