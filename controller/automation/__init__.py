"""`controller.automation.PipelineController`, as the reference's import path expects."""

from controller.pipeline import PipelineController

__all__ = ["PipelineController"]
