"""Output models: weights files a step stores and records in `task.models['output']`.

Each `OutputModel` is one entry of the task's output models (`{id, name, url,
framework, sha256, size, iteration, ...}`); `update_weights` uploads the file and
replaces that entry's url, so the last model created is `task.models['output'][-1]`
and a pipeline can refer to `${step.models.output.-1.url}`. Weights are stored under
`<output_uri>/<project>/<task id>/models/<model name>/<file name>`; a folder is zipped.
In the default files area the url recorded is `conveyor://files/...`, resolved by every
reader against its own `CONVEYOR_API` (older records' http URLs are resolved by path).
The task's output models are read, changed and written back as a whole: two processes
adding models to the same task at the same moment may lose one (a step normally owns
its task).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.models import Model as ModelRecord
from controller.sdk import storage
from controller.sdk.params import to_stored

if TYPE_CHECKING:
    from controller.sdk.task import Task

_models_lock = threading.Lock()


class ModelEntry:
    """A model recorded on a task (`task.models['output'][i]`): name, url, framework."""

    def __init__(self, record: ModelRecord) -> None:
        self._record = record

    def __repr__(self) -> str:
        return f"<Model {self.name!r} url={self.url}>"

    @property
    def id(self) -> str:
        """The model's id (unique per model entry)."""
        return str(getattr(self._record, "id", "") or "")

    @property
    def name(self) -> str:
        """The model's name."""
        return self._record.name

    @property
    def url(self) -> str:
        """Where the weights are stored, as recorded (`conveyor://files/...` for the files
        area, valid on every host; else the external URL)."""
        return self._record.url

    @property
    def public_url(self) -> str:
        """An address of the weights for code outside Conveyor (see `Artifact.public_url`)."""
        return storage.public_url(self.url)

    @property
    def framework(self) -> str:
        """The framework given when it was created ("" if none)."""
        return self._record.framework

    @property
    def data(self) -> dict[str, Any]:
        """The whole record (sha256, size, iteration, ...)."""
        return self._record.model_dump()

    def get_local_copy(self, extract_archive: bool = True, force_download: bool = False) -> str:
        """A local path holding the weights (checked against the recorded sha256)."""
        path = storage.download(
            self.url, expected_sha256=getattr(self._record, "sha256", None) or None, force=force_download
        )
        if extract_archive and path.suffix == ".zip" and zipfile.is_zipfile(path):
            return str(storage.extract_zip(path))
        return str(path)


class ModelList(list):
    """A list of ModelEntry that can also be indexed by model name (the last of that name)."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            for entry in reversed(self):
                if entry.name == key:
                    return entry
            known = ", ".join(e.name for e in self) or "none"
            raise KeyError(f"no model named {key!r} (models: {known})")
        return super().__getitem__(key)


class OutputModel:
    """A model a task produces (the reference's OutputModel).

    `task` defaults to `Task.current_task()`; `name` to the task's name.
    `config_text`/`config_dict`, `label_enumeration`, `tags` and `comment` are recorded
    with the model entry.
    """

    def __init__(
        self,
        task: Task | None = None,
        config_text: str | None = None,
        config_dict: dict | None = None,
        label_enumeration: dict[str, int] | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        comment: str | None = None,
        framework: str | None = None,
        base_model_id: str | None = None,
    ) -> None:
        if task is None:
            from controller.sdk.task import Task

            task = Task.current_task()
            if task is None:
                raise RuntimeError("OutputModel needs a task: pass task= or call Task.init() first")
        self._task = task
        self.id = uuid.uuid4().hex
        self.name = name or task.name
        self.framework = framework or ""
        self.url = ""
        self._extra: dict[str, Any] = {
            "config": to_stored(config_dict) if config_dict is not None else config_text,
            "labels": to_stored(dict(label_enumeration or {})),
            "tags": list(tags or []),
            "comment": comment or "",
            "base_model_id": base_model_id or "",
        }

    @property
    def task(self) -> Task:
        """The task the model belongs to."""
        return self._task

    def __repr__(self) -> str:
        return f"<OutputModel {self.name!r} url={self.url or '(no weights yet)'}>"

    def update_weights(
        self,
        weights_filename: str | os.PathLike[str] | None = None,
        upload_uri: str | None = None,
        target_filename: str | None = None,
        auto_delete_file: bool = True,
        register_uri: str | None = None,
        iteration: int | None = None,
        update_comment: bool = True,
        is_package: bool = False,
        async_enable: bool = True,
    ) -> str:
        """Upload a weights file (or folder, zipped) and record it; returns its URL.

        `upload_uri` overrides the task's output_uri; `register_uri` records an existing
        URL without uploading. Uploads are synchronous (`async_enable` changes nothing)
        and the user's file is never deleted (`auto_delete_file` only concerns the zip
        made for a folder, which is always removed).
        """
        if register_uri:
            self._record(register_uri, None, "", iteration)
            return register_uri
        if weights_filename is None:
            raise ValueError(f"model {self.name!r}: give weights_filename or register_uri")
        source = Path(weights_filename).expanduser()
        if not source.exists():
            raise FileNotFoundError(f"model {self.name!r}: no such weights file: {source}")
        tmp_dir = Path(tempfile.mkdtemp(prefix="conveyor-model-"))
        try:
            if source.is_dir():
                zipped = tmp_dir / f"{(target_filename or source.name)}.zip"
                with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
                    for path in sorted(source.rglob("*")):
                        if path.is_file():
                            zf.write(path, path.relative_to(source).as_posix())
                source, filename = zipped, zipped.name
            else:
                filename = target_filename or source.name
            url = storage.join_url(
                upload_uri or self._task.output_uri,
                storage.safe_segment(self._task.project),
                self._task.id,
                "models",
                storage.safe_segment(self.name, "model"),
                storage.safe_segment(filename, "weights"),
            )
            stored = storage.upload(source, url)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        self._record(stored.url, stored.size, stored.sha256, iteration)
        return stored.url

    def update_weights_package(
        self,
        weights_filenames: list[str] | None = None,
        weights_path: str | None = None,
        upload_uri: str | None = None,
        target_filename: str | None = None,
        auto_delete_file: bool = True,
        iteration: int | None = None,
        async_enable: bool = True,
    ) -> str:
        """Upload several files (or a folder) as one zipped model; returns its URL."""
        if weights_path:
            return self.update_weights(weights_path, upload_uri, target_filename, iteration=iteration)
        if not weights_filenames:
            raise ValueError(f"model {self.name!r}: give weights_filenames or weights_path")
        with tempfile.TemporaryDirectory(prefix="conveyor-package-") as tmp:
            folder = Path(tmp) / (target_filename or storage.safe_segment(self.name, "model"))
            folder.mkdir()
            for name in weights_filenames:
                shutil.copy2(name, folder / Path(name).name)
            return self.update_weights(folder, upload_uri, iteration=iteration)

    def _record(self, url: str, size: int | None, sha256: str, iteration: int | None) -> None:
        self.url = url
        entry = {
            "id": self.id, "name": self.name, "url": url, "framework": self.framework,
            "size": size, "sha256": sha256, "iteration": iteration, "timestamp": time.time(),
            **self._extra,
        }
        with _models_lock:
            record = self._task._backend.get_task(self._task.id)
            models = {kind: [m.model_dump(mode="json") for m in items] for kind, items in record.models.items()}
            outputs = models.setdefault("output", [])
            for i, existing in enumerate(outputs):
                if existing.get("id") == self.id:
                    outputs[i] = entry
                    break
            else:
                outputs.append(entry)
            self._task._record = self._task._backend.edit_task(self._task.id, {"models": models}, force=True)
