"""Task parameters: `connect`, configurations and "Section/name" hyperparameters.

A mixin of `controller.sdk.task.Task` (the parameter half of its API); the casting
rules are in `controller.sdk.params`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.sdk import params

if TYPE_CHECKING:
    from controller.backend import Backend
    from controller.models import TaskRecord


class TaskParameters:
    """Hyperparameters and configuration objects of a task."""

    _record: TaskRecord
    _backend: Backend
    _own: bool

    if TYPE_CHECKING:
        @property
        def id(self) -> str: ...

        def reload(self) -> Any: ...

        def running_remotely(self) -> bool: ...

    def _edit(self, changes: Mapping[str, Any]) -> None:
        self._record = self._backend.edit_task(self.id, changes, force=self._own)

    def connect(self, mutable: Any, name: str | None = None) -> Any:
        """Store a dict's (or object's, or class's) values as the hyperparameter section
        `name` (default "General") and return it.

        Under an agent, values stored on the task (overrides of a clone) replace the
        dict's values in place, cast to the type of each default (see
        `controller.sdk.params`). Returns the same dict or object.
        """
        argparse = sys.modules.get("argparse")  # not loaded: `mutable` cannot be a parser
        if argparse is not None and isinstance(mutable, argparse.ArgumentParser):
            raise TypeError("connect the parsed arguments (parser.parse_args()), not the parser")
        section = name or params.DEFAULT_SECTION
        defaults = params.read_values(mutable)
        remote = self.running_remotely()
        if remote:
            self.reload()
        stored = self._record.hyperparams.get(section, {})
        values = params.merge_connected(defaults, stored, section, prefer_stored=remote)
        params.write_values(mutable, {k: v for k, v in values.items() if v is not defaults[k]})
        self._edit({"hyperparams": {section: {k: params.to_stored(v) for k, v in values.items()}}})
        return mutable

    def connect_configuration(
        self, configuration: Mapping[str, Any] | str | os.PathLike[str], name: str | None = None,
        description: str | None = None,
    ) -> Any:
        """Store a configuration (a dict, or the text of a file) under `name` (default
        "General").

        Under an agent the stored configuration wins: a dict is updated in place with
        it; for a file, the path of a local file with the stored text is returned.
        """
        name = name or params.DEFAULT_SECTION
        remote = self.running_remotely()
        stored = self.reload()._record.configuration.get(name) if remote else None
        if isinstance(configuration, Mapping):
            if remote and stored is not None:
                values = _as_dict(stored, name)
                if hasattr(configuration, "clear"):
                    configuration.clear()  # type: ignore[union-attr]
                    configuration.update(values)  # type: ignore[union-attr]
                    return configuration
                return values
            self._edit({"configuration": {name: params.to_stored(configuration)}})
            return configuration
        if isinstance(configuration, str | os.PathLike):
            path = Path(configuration).expanduser()
            if remote and stored is not None:
                text = stored if isinstance(stored, str) else _json_text(stored)
                if path.is_file() and path.read_text() == text:
                    return configuration
                target = Path(tempfile.mkdtemp(prefix="conveyor-config-")) / (path.name or "config.txt")
                target.write_text(text)
                return str(target)
            if not path.is_file():
                raise FileNotFoundError(f"connect_configuration({name!r}): no such file {path}")
            self._edit({"configuration": {name: path.read_text()}})
            return configuration
        raise TypeError(f"connect_configuration: give a dict or a file path, not {type(configuration).__name__}")

    def get_configuration_object(self, name: str) -> Any:
        """The configuration stored under `name` (text or dict); None if there is none."""
        return self.reload()._record.configuration.get(name)

    def get_parameters(self, backwards_compatibility: bool = True, cast: bool = False) -> dict[str, Any]:
        """Every hyperparameter as {"Section/name": value}, values as stored (JSON types)."""
        return params.flatten(self.reload()._record.hyperparams)

    def get_parameters_as_dict(self, cast: bool = False) -> dict[str, dict[str, Any]]:
        """Every hyperparameter as {section: {name: value}}."""
        return {s: dict(p) for s, p in self.reload()._record.hyperparams.items()}

    def get_parameter(self, name: str, default: Any = None, cast: bool = False) -> Any:
        """The value of "Section/name" (a bare name is in "General"), else `default`."""
        section, key = params.split_key(name)
        return self.reload()._record.hyperparams.get(section, {}).get(key, default)

    def set_parameters(self, *args: Mapping[str, Any], **kwargs: Any) -> None:
        """Set hyperparameters from {"Section/name": value} dicts and keywords.

        Other parameters are kept (unlike the reference, which replaces every section:
        dropping a section such as "Environment" by accident is worse than keeping it).
        Only a draft task, or the task of this process, can be changed.
        """
        flat: dict[str, Any] = {}
        for mapping in args:
            flat.update(mapping)
        flat.update(kwargs)
        if flat:
            self._edit({"hyperparams": params.nest(flat)})

    update_parameters = set_parameters

    def set_parameter(self, name: str, value: Any, description: str | None = None) -> None:
        """Set one hyperparameter "Section/name" (a bare name is in "General")."""
        self.set_parameters({name: value})


def _as_dict(stored: Any, name: str) -> dict[str, Any]:
    if isinstance(stored, dict):
        return dict(stored)
    try:
        value = json.loads(stored)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"configuration {name!r} stored on the task is not a dict: {str(stored)[:100]!r}")
    return value


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2)
