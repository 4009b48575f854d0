"""The files endpoint: artifacts and models stored by steps, served to agents anywhere.

`PUT {prefix}/files/{path}` stores the request body at `files_dir/path`;
`GET` (and `HEAD`) `{prefix}/files/{path}` sends it back. The SDK uses it as the default
destination when it talks to the server over HTTP, so a step on one machine can read
what a step on another machine stored.

Decisions:

- **Streaming.** Bodies are written to disk chunk by chunk as they arrive (the API's
  64 MiB body limit does not apply here); files are sent with a streaming response
  (range requests supported).
- **Size limit.** `max_file_bytes` (default `MAX_FILE_BYTES`): a larger declared
  Content-Length is refused before reading (413), a body that grows past it is cut off.
- **Integrity.** The body's sha256 is computed while it is written. When the client
  sends `X-Conveyor-Sha256`, a mismatch is refused (422) and nothing is stored. The
  answer carries the sha256 and size of what was stored.
- **Atomic.** The body goes to a temporary file next to the target, renamed into place
  once complete and verified: readers see the old file or the new one, never a part.
- **Paths.** Relative, at most `MAX_PATH_CHARS` characters, segments non-empty, not
  "." or "..", at most `MAX_SEGMENT_BYTES` bytes in UTF-8, no backslashes or NUL; the
  resolved path (symlinks followed) must stay inside `files_dir`. Anything else is
  refused with 422 naming the path. Answers never show the server's folder: a file
  system error is reported about the path the client gave.
- **Auth.** The token middleware in front of the whole app covers these routes too.
- **Files follow tasks.** The SDK stores a task's files under `<project>/<task id>/`.
  Deleting a task through the server removes that folder (`remove_task_files`);
  `controller files gc` (`collect_garbage`) removes the folders of tasks that no longer
  exist (deleted another way, e.g. straight in the database). Files outside task
  folders (uploaded with `StorageManager.upload_file` to a path of one's own) are never
  removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, JSONResponse

from controller.errors import ConflictError, InvalidInputError, NotFoundError
from controller.models import TaskRecord
from controller.sdk.storage import files_path_of, safe_segment

#: Largest file the endpoint stores (10 GiB).
MAX_FILE_BYTES = 10 * 1024**3
MAX_PATH_CHARS = 1024
#: Longest path segment (file or folder name) in UTF-8 bytes: the usual file system limit.
MAX_SEGMENT_BYTES = 255
SHA256_HEADER = "X-Conveyor-Sha256"
TAGS: list[str | Enum] = ["files"]
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TASK_ID = re.compile(r"^[0-9a-f]{32}$")


class FileTooLargeError(InvalidInputError):
    """A file over the endpoint's size limit."""

    http_status = 413


def resolve_file_path(files_dir: Path, path: str) -> Path:
    """The file `path` names under `files_dir`; InvalidInputError if it would leave it."""
    if not path or len(path) > MAX_PATH_CHARS:
        raise InvalidInputError(f"invalid file path {path[:80]!r}: 1-{MAX_PATH_CHARS} characters", field="path")
    segments = path.split("/")
    if (
        path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(s in ("", ".", "..") for s in segments)
    ):
        raise InvalidInputError(
            f"invalid file path {path!r}: use relative segments without '.', '..', '\\' or empty parts",
            field="path",
        )
    long_segment = next((s for s in segments if len(s.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES), None)
    if long_segment is not None:
        raise InvalidInputError(
            f"invalid file path {path[:80]!r}: the name {long_segment[:40]!r}... is longer "
            f"than {MAX_SEGMENT_BYTES} bytes",
            field="path",
        )
    root = files_dir.resolve()
    try:
        target = (root / path).resolve()
    except OSError as exc:
        raise _file_system_error(path, exc) from None
    if not target.is_relative_to(root) or target == root:
        raise InvalidInputError(f"invalid file path {path!r}: it leaves the files folder", field="path")
    return target


def add_file_routes(r: APIRouter, prefix: str, files_dir: Path, max_file_bytes: int = MAX_FILE_BYTES) -> None:
    """Add PUT/GET/HEAD {prefix}/files/{path} storing files under `files_dir`."""
    P = prefix

    @r.put(P + "/files/{path:path}", tags=TAGS, status_code=201, summary="Store a file")
    async def put_file(path: str, request: Request) -> JSONResponse:
        target = resolve_file_path(files_dir, path)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_file_bytes:
            raise FileTooLargeError(_too_large(path, max_file_bytes), field="body")
        expected = request.headers.get(SHA256_HEADER, "").strip().lower() or None
        if expected is not None and not _HEX64.match(expected):
            raise InvalidInputError(f"{SHA256_HEADER} must be 64 hex digits", field=SHA256_HEADER)
        try:
            is_dir = target.is_dir()
        except OSError as exc:
            raise _file_system_error(path, exc) from None
        if is_dir:
            raise ConflictError(f"cannot store {path!r}: it is a folder", field="path")
        try:
            await run_in_threadpool(target.parent.mkdir, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConflictError(f"cannot store {path!r}: a parent of it is a file", field="path") from None
        except OSError as exc:
            raise _file_system_error(path, exc) from None
        # Not derived from the name: a 255-byte name plus a suffix would be too long.
        tmp = target.with_name(f".upload-{uuid.uuid4().hex}.part")
        digest = hashlib.sha256()
        size = 0
        try:
            try:
                out = open(tmp, "wb")  # noqa: SIM115 - closed below
            except OSError as exc:
                raise _file_system_error(path, exc) from None
            with out:
                async for chunk in request.stream():
                    if not chunk:
                        continue
                    size += len(chunk)
                    if size > max_file_bytes:
                        raise FileTooLargeError(_too_large(path, max_file_bytes), field="body")
                    digest.update(chunk)
                    await run_in_threadpool(out.write, chunk)
            sha256 = digest.hexdigest()
            if expected is not None and sha256 != expected:
                raise InvalidInputError(
                    f"sha256 mismatch for {path!r}: received {sha256}, expected {expected}; nothing stored",
                    field=SHA256_HEADER,
                )
            await run_in_threadpool(os.replace, tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        body: dict[str, Any] = {"path": path, "size": size, "sha256": sha256}
        return JSONResponse(body, status_code=201, headers={SHA256_HEADER: sha256})

    @r.get(P + "/files/{path:path}", tags=TAGS, summary="Get a file")
    async def get_file(path: str) -> FileResponse:
        target = resolve_file_path(files_dir, path)
        try:
            is_file = target.is_file()
        except OSError as exc:
            raise _file_system_error(path, exc) from None
        if not is_file:
            raise NotFoundError(f"no file {path!r}", field="path")
        return FileResponse(target, media_type="application/octet-stream", filename=target.name)

    # HEAD is its own route (one route with two methods gives both the same operation id).
    r.add_api_route(P + "/files/{path:path}", get_file, methods=["HEAD"], name="head_file", tags=TAGS,
                    summary="Get a file's headers (size, type), without the body")


def _file_system_error(path: str, exc: OSError) -> InvalidInputError:
    """422 about the client's `path` for a file system error, without the server's folder
    (the OSError's text names the absolute path)."""
    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return InvalidInputError(f"cannot use file path {path[:200]!r}: {reason}", field="path")


def _too_large(path: str, limit: int) -> str:
    return f"file {path!r} is too large: the limit is {limit} bytes"


# ------------------------------------------------------------ files follow tasks
def task_folders(files_dir: Path, record: TaskRecord) -> list[Path]:
    """The folders of `files_dir` holding files of the task `record` (existing ones).

    `<project>/<task id>/` of its project, and of every artifact or model of it recorded
    in the files area (a task moved to another project keeps its first folder).
    """
    candidates = {f"{safe_segment(record.project)}/{record.id}"}
    urls = [a.uri for a in record.artifacts.values()]
    urls += [m.url for models in record.models.values() for m in models]
    for url in urls:
        path = files_path_of(url or "")
        parts = path.split("/") if path else []
        if len(parts) > 2 and parts[1] == record.id:
            candidates.add(f"{parts[0]}/{record.id}")
    folders = []
    for relative in sorted(candidates):
        try:
            folder = resolve_file_path(files_dir, relative)
        except InvalidInputError:
            continue
        if folder.is_dir():
            folders.append(folder)
    return folders


def remove_task_files(files_dir: Path, record: TaskRecord) -> list[Path]:
    """Remove the folders of a deleted task from `files_dir`; the folders removed."""
    folders = task_folders(files_dir, record)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        _remove_if_empty(folder.parent, files_dir)
    return folders


def orphan_task_folders(files_dir: Path, task_exists: Callable[[str], bool]) -> Iterator[Path]:
    """Folders `<project>/<task id>/` of `files_dir` whose task `task_exists` denies."""
    if not files_dir.is_dir():
        return
    for project in sorted(p for p in files_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        for folder in sorted(project.iterdir()):
            if folder.is_dir() and _TASK_ID.match(folder.name) and not task_exists(folder.name):
                yield folder


def collect_garbage(
    files_dir: Path, task_exists: Callable[[str], bool], *, dry_run: bool = False
) -> list[Path]:
    """Remove (unless `dry_run`) the folders of tasks that no longer exist; those folders."""
    found = list(orphan_task_folders(files_dir, task_exists))
    if not dry_run:
        for folder in found:
            shutil.rmtree(folder, ignore_errors=True)
            _remove_if_empty(folder.parent, files_dir)
    return found


def _remove_if_empty(folder: Path, files_dir: Path) -> None:
    if folder.resolve() != files_dir.resolve():
        try:
            folder.rmdir()
        except OSError:  # not empty (other tasks of the project) or already gone
            pass
