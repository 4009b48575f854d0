"""Components defined in their own module (PipelineDecorator must handle that)."""

import statistics

from controller.automation.controller import PipelineDecorator


@PipelineDecorator.component(return_values=["mean", "spread"], packages=[])
def summarize(values: list = None):
    values = values or [1, 2, 3]
    return statistics.mean(values), max(values) - min(values)
