"""`controller.automation.controller`: the reference's module path for the pipeline classes."""

from controller.pipeline import PipelineController, PipelineDecorator

__all__ = ["PipelineController", "PipelineDecorator"]
