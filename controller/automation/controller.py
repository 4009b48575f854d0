"""`controller.automation.controller`: the reference's module path for the pipeline classes."""

from controller.pipeline import PipelineController

__all__ = ["PipelineController"]
