"""`controller.automation`: the reference's import path for the pipeline classes."""

from controller.pipeline import PipelineController, PipelineDecorator

__all__ = ["PipelineController", "PipelineDecorator"]
