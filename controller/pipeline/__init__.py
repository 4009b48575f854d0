"""Pipelines: PipelineController (DAGs of tasks and functions), PipelineDecorator, the engine.

The names below are loaded on first use (PEP 562), so a function step, which imports
`controller.pipeline.function_runner`, does not load the pipeline engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller.pipeline.controller import PipelineController
    from controller.pipeline.dag import PipelineDefinitionError
    from controller.pipeline.decorator import PipelineDecorator
    from controller.pipeline.lazy import PipelineStepError
    from controller.pipeline.node import Node

#: Exported name → the module defining it.
_EXPORTS = {
    "Node": "controller.pipeline.node",
    "PipelineController": "controller.pipeline.controller",
    "PipelineDecorator": "controller.pipeline.decorator",
    "PipelineDefinitionError": "controller.pipeline.dag",
    "PipelineStepError": "controller.pipeline.lazy",
}

__all__ = ["Node", "PipelineController", "PipelineDecorator", "PipelineDefinitionError", "PipelineStepError"]


def __getattr__(name: str) -> Any:
    """Load an exported name from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'controller.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
