"""Lazy results of PipelineDecorator components.

Calling a component inside a pipeline function launches its step and returns at once
with one LazyResult per return value. Passing a LazyResult to another component makes a
DAG edge (the value never comes to the pipeline process); using it in Python code
(arithmetic, formatting, comparison, attribute access, iteration, truth) waits for the
step and works on the real value, fetched once from the step's artifact.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any


class PipelineStepError(RuntimeError):
    """A component's step failed or was aborted, and its result was needed."""


class LazyResult:
    """A component's return value that is fetched when first used."""

    __slots__ = ("_fetch", "_step", "_name", "_cache", "_done")

    def __init__(self, step: str, name: str, fetch: Callable[[], Any]) -> None:
        object.__setattr__(self, "_step", step)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fetch", fetch)
        object.__setattr__(self, "_done", False)
        object.__setattr__(self, "_cache", None)

    @property
    def reference(self) -> str:
        """The `${step.return_name}` reference this result stands for."""
        return f"${{{self._step}.{self._name}}}"

    def __wrapped_value__(self) -> Any:
        if not self._done:
            object.__setattr__(self, "_cache", self._fetch())
            object.__setattr__(self, "_done", True)
        return self._cache

    def __repr__(self) -> str:
        if self._done:
            return repr(self._cache)
        return f"<result {self._name!r} of pipeline step {self._step!r} (not fetched yet)>"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__wrapped_value__(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__wrapped_value__(), name, value)

    def __str__(self) -> str:
        return str(self.__wrapped_value__())

    def __format__(self, spec: str) -> str:
        return format(self.__wrapped_value__(), spec)

    def __bool__(self) -> bool:
        return bool(self.__wrapped_value__())

    def __len__(self) -> int:
        return len(self.__wrapped_value__())

    def __iter__(self) -> Any:
        return iter(self.__wrapped_value__())

    def __contains__(self, item: Any) -> bool:
        return item in self.__wrapped_value__()

    def __getitem__(self, key: Any) -> Any:
        return self.__wrapped_value__()[key]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped_value__()(*args, **kwargs)

    def __hash__(self) -> int:
        return hash(self.__wrapped_value__())

    def __int__(self) -> int:
        return int(self.__wrapped_value__())

    def __float__(self) -> float:
        return float(self.__wrapped_value__())

    def __index__(self) -> int:
        return operator.index(self.__wrapped_value__())

    def __neg__(self) -> Any:
        return -self.__wrapped_value__()

    def __pos__(self) -> Any:
        return +self.__wrapped_value__()

    def __abs__(self) -> Any:
        return abs(self.__wrapped_value__())

    def __round__(self, ndigits: int | None = None) -> Any:
        return round(self.__wrapped_value__(), ndigits)


def _value(obj: Any) -> Any:
    return obj.__wrapped_value__() if isinstance(obj, LazyResult) else obj


def _binary(op: Callable[[Any, Any], Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def forward(self: LazyResult, other: Any) -> Any:
        return op(self.__wrapped_value__(), _value(other))

    def reverse(self: LazyResult, other: Any) -> Any:
        return op(_value(other), self.__wrapped_value__())

    return forward, reverse


for _name, _op in {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow,
    "matmul": operator.matmul, "and": operator.and_, "or": operator.or_, "xor": operator.xor,
    "lshift": operator.lshift, "rshift": operator.rshift,
}.items():
    _forward, _reverse = _binary(_op)
    setattr(LazyResult, f"__{_name}__", _forward)
    setattr(LazyResult, f"__r{_name}__", _reverse)

for _name, _op in {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
                   "gt": operator.gt, "ge": operator.ge}.items():
    setattr(LazyResult, f"__{_name}__", _binary(_op)[0])


def resolve_value(obj: Any) -> Any:
    """The real value of a LazyResult (waits for its step); other objects as they are."""
    return _value(obj)
