"""Artifacts: turning objects into files, storing them, and getting them back.

What `upload_artifact` makes of an object (the reference's list, with our decisions):

| object                               | stored as                 | `type`   | `.get()` returns        |
|--------------------------------------|---------------------------|----------|-------------------------|
| path (str or Path) of a file         | the file itself           | file     | local path (str)        |
| path of a folder, or a glob pattern  | a .zip of it              | folder   | extracted folder (str)  |
| dict that survives JSON exactly      | .json                     | dict     | the dict                |
| pandas.DataFrame                     | .csv.gz (index included)  | pandas   | a DataFrame             |
| numpy.ndarray (not dtype=object)     | .npz (key "arr")          | numpy    | the array               |
| PIL.Image.Image                      | .png                      | image    | a PIL image             |
| a URL string (`scheme://...`)        | nothing: a link           | url      | the URL                 |
| any other str                        | .txt (UTF-8)              | str      | the string              |
| anything else (auto_pickle=True)     | .pkl                      | pickle   | the unpickled object    |
| with `serialization_function`        | .bin (its bytes)          | custom   | bytes, or what `deserialization_function` makes of them |

A dict that JSON would change (int keys, tuples, NaN, non-JSON values) is pickled
instead, so `.get()` always returns an equal object. A DataFrame comes back as CSV
parses it: numbers and strings round-trip; datetimes and categories come back as text.
Uploads are synchronous (`wait_on_upload` is accepted and changes nothing), so every
artifact is stored before the step ends and the agent reports it completed.

Names: 1-200 characters, no "/", "\\", NUL or control characters, not "." or "..", so an
artifact can never be written outside its folder
`<output_uri>/<project>/<task id>/artifacts/<name>/`. An artifact uploaded again under
the same name replaces the previous one.

Records: by default (`output_uri` unset) over HTTP an artifact's `uri` is the
location-independent `conveyor://files/<project>/<task id>/artifacts/<name>/<file>`
(see `controller.sdk.storage`); before, it was the absolute `http://<address the
uploader used>/api/v1/files/...` URL, which still reads: an old files-endpoint URL is
resolved by its path. On the embedded store it stays `file://$CONVEYOR_HOME/files/...`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.backend import Backend
from controller.models import Artifact as ArtifactRecord
from controller.sdk import storage

MAX_ARTIFACT_NAME_CHARS = 200
MAX_PREVIEW_CHARS = 1000
_GLOB_CHARS = frozenset("*?[")


def check_artifact_name(name: object) -> str:
    """Return `name` if it is a usable artifact name, else raise ValueError saying why."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid artifact name {name!r}: give a non-empty string")
    if len(name) > MAX_ARTIFACT_NAME_CHARS:
        raise ValueError(f"invalid artifact name {name[:40]!r}...: longer than {MAX_ARTIFACT_NAME_CHARS} characters")
    if name in (".", "..") or "/" in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise ValueError(
            f"invalid artifact name {name!r}: it must not contain '/', '\\' or control "
            "characters, nor be '.' or '..' (names cannot leave their storage folder)"
        )
    return name


# ------------------------------------------------------------------ serializing
@dataclass
class Serialized:
    """The file to upload for an artifact, and what it is."""

    type: str
    path: Path | None = None  # None for a link (type "url")
    filename: str = ""
    preview: str = ""
    originals: list[Path] = field(default_factory=list)  # what delete_after_upload removes


def _instance_of(obj: object, module: str, attr: str) -> bool:
    """isinstance check that never imports `module` (if it isn't loaded, obj can't be one)."""
    mod = sys.modules.get(module)
    cls = getattr(mod, attr, None) if mod is not None else None
    return cls is not None and isinstance(obj, cls)


def _short(text: str) -> str:
    return text if len(text) <= MAX_PREVIEW_CHARS else text[: MAX_PREVIEW_CHARS - 3] + "..."


def _zip(files: list[tuple[Path, str]], target: Path) -> None:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, arcname in files:
            zf.write(path, arcname)


def _folder_files(folder: Path) -> list[tuple[Path, str]]:
    return [(p, p.relative_to(folder).as_posix()) for p in sorted(folder.rglob("*")) if p.is_file()]


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard."""
    base: list[str] = []
    for part in Path(pattern).parts:
        if _GLOB_CHARS & set(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def serialize(
    name: str,
    obj: Any,
    work_dir: Path,
    *,
    auto_pickle: bool = True,
    serialization_function: Callable[[Any], bytes | bytearray] | None = None,
) -> Serialized:
    """Write `obj` to a file in `work_dir` (or point at the user's file) for upload."""
    if serialization_function is not None:
        data = serialization_function(obj)
        if not isinstance(data, bytes | bytearray):
            raise ValueError(
                f"artifact {name!r}: serialization_function returned {type(data).__name__}, not bytes"
            )
        path = work_dir / f"{name}.bin"
        path.write_bytes(bytes(data))
        return Serialized("custom", path, path.name, f"{len(data)} bytes (custom serialization)")
    if isinstance(obj, Path) or (isinstance(obj, str) and _names_local_files(obj)):
        return _serialize_path(name, os.fspath(obj), work_dir)
    if isinstance(obj, str):
        if storage.is_url(obj):
            return Serialized("url", None, "", obj)
        path = work_dir / f"{name}.txt"
        path.write_text(obj, encoding="utf-8")
        return Serialized("str", path, path.name, _short(obj))
    if isinstance(obj, dict):
        text = _json_exact(obj)
        if text is not None:
            path = work_dir / f"{name}.json"
            path.write_text(text, encoding="utf-8")
            return Serialized("dict", path, path.name, _short(text))
    elif _instance_of(obj, "pandas", "DataFrame"):
        path = work_dir / f"{name}.csv.gz"
        obj.to_csv(path, compression="gzip")
        rows, cols = obj.shape
        return Serialized("pandas", path, path.name, f"{rows} rows x {cols} columns: {list(obj.columns)[:20]}")
    elif _instance_of(obj, "numpy", "ndarray") and not obj.dtype.hasobject:
        import numpy as np

        path = work_dir / f"{name}.npz"
        with open(path, "wb") as f:
            np.savez_compressed(f, arr=obj)
        return Serialized("numpy", path, path.name, f"array shape {obj.shape} dtype {obj.dtype}")
    elif _instance_of(obj, "PIL.Image", "Image"):
        path = work_dir / f"{name}.png"
        obj.save(path, format="PNG")
        return Serialized("image", path, path.name, f"image {obj.mode} {obj.size[0]}x{obj.size[1]}")
    if not auto_pickle:
        raise ValueError(
            f"artifact {name!r}: objects of type {type(obj).__name__} are not a supported artifact "
            "type and auto_pickle=False (pass auto_pickle=True or a serialization_function)"
        )
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - pickle raises many kinds
        raise ValueError(
            f"artifact {name!r}: cannot pickle the object of type {type(obj).__name__}: {exc} "
            "(pass a serialization_function, or upload a file)"
        ) from exc
    path = work_dir / f"{name}.pkl"
    path.write_bytes(data)
    return Serialized("pickle", path, path.name, _short(_safe_repr(obj)))


def _names_local_files(text: str) -> bool:
    if not text or "\n" in text or len(text) > 4096 or storage.is_url(text):
        return False
    try:
        if Path(text).expanduser().exists():
            return True
    except OSError:
        return False
    if not _GLOB_CHARS & set(text):
        return False
    import glob

    return bool(glob.glob(os.path.expanduser(text), recursive=True))


def _serialize_path(name: str, text: str, work_dir: Path) -> Serialized:
    path = Path(text).expanduser()
    if path.is_file():
        return Serialized("file", path, path.name, f"{path.name} ({path.stat().st_size} bytes)", [path])
    if path.is_dir():
        target = work_dir / f"{path.resolve().name or name}.zip"
        files = _folder_files(path)
        _zip(files, target)
        return Serialized("folder", target, target.name, f"folder {path.name}: {len(files)} files", [path])
    if _GLOB_CHARS & set(text):
        import glob

        matches = [Path(p) for p in sorted(glob.glob(os.path.expanduser(text), recursive=True))]
        base = _glob_base(os.path.expanduser(text))
        files: list[tuple[Path, str]] = []
        for match in matches:
            if match.is_dir():
                files += [(p, (match / a).relative_to(base).as_posix()) for p, a in _folder_files(match)]
            else:
                files.append((match, match.relative_to(base).as_posix()))
        target = work_dir / f"{name}.zip"
        _zip(files, target)
        return Serialized("folder", target, target.name, f"{len(files)} files matching {text}", matches)
    raise ValueError(f"artifact {name!r}: no such file or folder: {text}")


def _json_exact(obj: dict) -> str | None:
    """The JSON text of `obj` if loading it gives back an equal dict, else None."""
    try:
        text = json.dumps(obj, ensure_ascii=False, indent=1, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return text if json.loads(text) == obj else None


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not fail the upload
        return f"<{type(obj).__name__}>"


# ---------------------------------------------------------------------- upload
def upload_artifact(
    backend: Backend,
    task_id: str,
    project: str,
    destination: str,
    name: str,
    artifact_object: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    delete_after_upload: bool = False,
    auto_pickle: bool = True,
    preview: Any = None,
    serialization_function: Callable[[Any], bytes | bytearray] | None = None,
) -> dict[str, Any]:
    """Serialize, store under `destination` and record an artifact on the task; its record."""
    check_artifact_name(name)
    meta = dict(metadata or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"artifact {name!r}: metadata must be JSON-serializable: {exc}") from None
    work_dir = Path(tempfile.mkdtemp(prefix="conveyor-artifact-"))
    try:
        item = serialize(
            name, artifact_object, work_dir,
            auto_pickle=auto_pickle, serialization_function=serialization_function,
        )
        record: dict[str, Any] = {
            "type": item.type,
            "metadata": meta,
            "preview": _short(str(preview)) if preview is not None else item.preview,
            "timestamp": time.time(),
        }
        if item.path is None:
            record.update(uri=str(artifact_object), size=None, sha256="")
        else:
            url = storage.join_url(
                destination, storage.safe_segment(project), task_id, "artifacts", name, item.filename
            )
            stored = storage.upload(item.path, url)
            record.update(uri=stored.url, size=stored.size, sha256=stored.sha256)
        backend.edit_task(task_id, {"artifacts": {name: record}}, force=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if delete_after_upload:
        for original in item.originals:
            if original.is_dir():
                shutil.rmtree(original, ignore_errors=True)
            else:
                original.unlink(missing_ok=True)
    return record


# ------------------------------------------------------------------ reading back
class Artifact:
    """An artifact of a task, as stored: `url`, `size`, `hash`, `type`, `metadata`."""

    def __init__(self, name: str, record: ArtifactRecord, task_id: str) -> None:
        self.name = name
        self.task_id = task_id
        self._record = record

    def __repr__(self) -> str:
        return f"<Artifact {self.name!r} type={self.type} url={self.url}>"

    @property
    def url(self) -> str:
        """Where the artifact is stored, as recorded: `conveyor://files/...` for the
        Conveyor files area (valid on every host: `get()`, `get_local_copy()`,
        `StorageManager` and pipeline references resolve it against `CONVEYOR_API`), or
        the external URL it was stored at (s3://, file://, ...)."""
        return self._record.uri

    @property
    def public_url(self) -> str:
        """An address for code outside Conveyor (browsers, curl): the server's public
        http(s) URL of the file (`controller serve --public-url`), a file:// URL on the
        embedded store, or the external URL as stored."""
        return storage.public_url(self.url)

    @property
    def size(self) -> int | None:
        """Size in bytes of the stored file (None for a link)."""
        return self._record.size

    @property
    def hash(self) -> str:
        """sha256 (hex) of the stored file ("" for a link)."""
        return self._record.sha256

    @property
    def type(self) -> str:
        """What was stored: file, folder, dict, pandas, numpy, image, url, str, pickle, custom."""
        return self._record.type

    @property
    def metadata(self) -> dict[str, Any]:
        """The metadata given at upload."""
        return dict(self._record.metadata)

    @property
    def preview(self) -> str:
        """A short description of the content."""
        return self._record.preview

    @property
    def timestamp(self) -> float | None:
        """When it was uploaded (seconds since the epoch)."""
        return self._record.timestamp

    def get_local_copy(
        self, extract_archive: bool = True, raise_on_error: bool = True, force_download: bool = False
    ) -> str:
        """A local path with the artifact's content (a folder for folder artifacts).

        Downloads are cached and checked against the recorded sha256. Errors always
        raise, whatever `raise_on_error` says (a None path only fails later, less clearly).
        """
        if self.type == "url":
            return storage.StorageManager.get_local_copy(
                self.url, extract_archive=extract_archive, force_download=force_download
            )
        path = storage.download(self.url, expected_sha256=self.hash or None, force=force_download)
        if extract_archive and self.type == "folder":
            return str(storage.extract_zip(path))
        return str(path)

    def get(self, deserialization_function: Callable[[bytes], Any] | None = None) -> Any:
        """The artifact as an object equal to the one uploaded (see the module table).

        With `deserialization_function`, it is called with the stored bytes and its
        result returned, whatever the type.
        """
        if self.type == "url" and deserialization_function is None:
            return self.url
        path = Path(self.get_local_copy(extract_archive=self.type == "folder"))
        if deserialization_function is not None:
            return deserialization_function(path.read_bytes())
        kind = self.type
        if kind in ("file", "folder"):
            return str(path)
        if kind == "dict":
            return json.loads(path.read_text(encoding="utf-8"))
        if kind == "str":
            return path.read_text(encoding="utf-8")
        if kind == "pickle":
            with open(path, "rb") as f:
                return pickle.load(f)
        if kind == "custom":
            return path.read_bytes()
        if kind == "pandas":
            pd = self._require("pandas", "a pandas DataFrame")
            return pd.read_csv(path, compression="gzip", index_col=0)
        if kind == "numpy":
            np = self._require("numpy", "a numpy array")
            with np.load(path, allow_pickle=False) as data:
                return data["arr"]
        if kind == "image":
            image_module = self._require("PIL.Image", "a PIL image")
            with image_module.open(path) as image:
                image.load()
                return image.copy()
        return str(path)  # an unknown type from a newer SDK: the file itself

    def _require(self, module: str, what: str) -> Any:
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError:
            package = {"PIL.Image": "pillow"}.get(module, module)
            raise ImportError(
                f"artifact {self.name!r} of task {self.task_id} is {what}: install {package} "
                "to load it (or use get_local_copy())"
            ) from None


class Artifacts(Mapping[str, Artifact]):
    """The artifacts of a task by name (read-only; `task.artifacts` re-reads the store)."""

    def __init__(self, task_id: str, records: Mapping[str, ArtifactRecord]) -> None:
        self._task_id = task_id
        self._items = {name: Artifact(name, rec, task_id) for name, rec in records.items()}

    def __getitem__(self, name: str) -> Artifact:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise KeyError(f"task {self._task_id} has no artifact {name!r} (its artifacts: {known})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"<Artifacts of task {self._task_id}: {', '.join(self._items) or 'none'}>"
