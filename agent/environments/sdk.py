"""The Conveyor SDK as seen from inside a task's virtualenv.

`sdk_dir()` builds (once, atomically, under `cache_root/sdk/<hash>/`) a directory of
symlinks: the `controller` and `agent` packages of `sdk_source`, plus, with
`with_deps=True`, every top-level file or folder (packages, modules, compiled
extensions, `*.libs`, `*.dist-info`) that the SDK's runtime dependencies installed
into the agent's own environment. The dependencies are the transitive closure of
`importlib.metadata.requires("conveyor")` (extras followed, markers otherwise ignored:
a requirement is followed when its distribution is installed), minus `SDK_EXCLUDED`.
A venv's `.pth` file adds this one directory after its own site-packages (see
`agent.environments.venv`). Symlinks, not copies: nothing is downloaded, building it
takes milliseconds, and a directory of absolute symlinks can be renamed into place.
The hash covers the linked paths (dist-info names carry versions) and the agent's
Python, so upgrading the agent's environment yields a new directory.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

LAYOUT_VERSION = 1
#: Requirements of `conveyor` a step never needs (server or agent only).
SDK_EXCLUDED = frozenset({"fastapi", "uvicorn", "gitpython", "uv", "virtualenv", "docker"})
#: Used when the `conveyor` distribution metadata is not installed.
SDK_FALLBACK_REQUIREMENTS = (
    "sqlalchemy>=2.0",
    "psycopg[binary]>=3.1",
    "requests>=2.31",
    "pydantic>=2.5",
    "click>=8.1",
    "psutil>=5.9",
    "filelock>=3.12",
    "fsspec>=2023.1",
)

#: The project name and extras at the start of a requirement line.
REQUIREMENT_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_REQ_RE = REQUIREMENT_RE
_EXTRA_RE = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def canonical_name(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


_canon = canonical_name


def sdk_requirements() -> list[str]:
    """Runtime requirements of the installed `conveyor` distribution a step needs."""
    try:
        requires = importlib.metadata.requires("conveyor") or []
    except importlib.metadata.PackageNotFoundError:
        return list(SDK_FALLBACK_REQUIREMENTS)
    out = []
    for req in requires:
        match = _REQ_RE.match(req)
        marker = req.partition(";")[2]
        if match and not _EXTRA_RE.search(marker) and _canon(match.group(1)) not in SDK_EXCLUDED:
            out.append(req.strip())
    return out


def _closure(requirements: Iterable[str]) -> list[importlib.metadata.Distribution]:
    """Installed distributions needed by `requirements`, transitively, extras included."""
    todo = []
    for req in requirements:
        match = _REQ_RE.match(req)
        if match:
            todo.append(
                (
                    match.group(1),
                    {_canon(e) for e in (match.group(2) or "").split(",") if e.strip()},
                )
            )
    dists: dict[str, importlib.metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    while todo:
        name, extras = todo.pop()
        canon = _canon(name)
        wanted = {e for e in {"", *extras} if (canon, e) not in done}
        if not wanted:
            continue
        try:
            dist = dists.get(canon) or importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        dists[canon] = dist
        done.update((canon, e) for e in wanted)
        for req in dist.requires or []:
            match = _REQ_RE.match(req)
            if not match:
                continue
            groups = {_canon(e) for e in _EXTRA_RE.findall(req.partition(";")[2])} or {""}
            if groups & wanted:
                sub = {_canon(e) for e in (match.group(2) or "").split(",") if e.strip()}
                todo.append((match.group(1), sub))
    return list(dists.values())


def distribution_top_levels(dist: importlib.metadata.Distribution) -> set[str]:
    """The top-level names (packages, modules, extensions, its .dist-info) a distribution
    installed into its site-packages, from its RECORD (else its top_level.txt)."""
    if dist.files is None:
        return set((dist.read_text("top_level.txt") or "").split())
    names = {Path(str(f)).parts[0] for f in dist.files if Path(str(f)).parts}
    return {n for n in names if not n.startswith("..") and n != "__pycache__" and not n.endswith(".pth")}


def _top_level_paths(dist: importlib.metadata.Distribution) -> list[Path]:
    """The top-level files and folders a distribution installed into site-packages."""
    base = Path(str(dist.locate_file("")))
    return [base / n for n in sorted(distribution_top_levels(dist)) if (base / n).exists()]


def default_sdk_source() -> Path:
    """The folder holding the installed `controller` package (and `agent`)."""
    import controller

    return Path(controller.__file__).resolve().parent.parent


_SDK_DIRS: dict[tuple[str, str, bool], Path] = {}


def sdk_packages(sdk_source: Path) -> dict[str, Path]:
    """The `controller` (and `agent`) package folders of `sdk_source`, by name.

    FileNotFoundError if there is no `controller` package.
    """
    entries: dict[str, Path] = {}
    for package in ("controller", "agent"):
        if (sdk_source / package).is_dir():
            entries[package] = (sdk_source / package).resolve()
    if "controller" not in entries:
        raise FileNotFoundError(f"no 'controller' package in the SDK source {sdk_source}")
    return entries


def sdk_dependency_paths() -> dict[str, Path]:
    """Top-level installed files and folders of the SDK's dependencies, by name.

    Computed once per process (~50 ms of metadata reads): the agent's own environment
    does not change under a running agent, and a restarted agent sees an upgrade.
    """
    return dict(_sdk_dependency_paths())


@functools.lru_cache(maxsize=1)
def _sdk_dependency_paths() -> dict[str, Path]:
    entries: dict[str, Path] = {}
    for dist in _closure(sdk_requirements()):
        for path in _top_level_paths(dist):
            entries.setdefault(path.name, path)
    return entries


def sdk_dir(cache_root: Path, sdk_source: Path, with_deps: bool) -> Path:
    """The directory of symlinks to the SDK packages (and their dependencies).

    Memoised per process; FileNotFoundError if `sdk_source` has no `controller`.
    """
    memo_key = (str(cache_root), str(sdk_source), with_deps)
    cached = _SDK_DIRS.get(memo_key)
    if cached is not None and cached.is_dir():
        return cached
    entries = sdk_packages(sdk_source)
    if with_deps:
        for name, path in sdk_dependency_paths().items():
            entries.setdefault(name, path)
    blob = json.dumps(
        [LAYOUT_VERSION, sys.version, sorted((k, str(v)) for k, v in entries.items())]
    )
    target = cache_root / "sdk" / hashlib.sha256(blob.encode()).hexdigest()[:16]
    if not target.is_dir():
        tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        for name, path in entries.items():
            os.symlink(path, tmp / name)
        try:
            os.rename(tmp, target)
        except OSError:  # another process published the same directory first
            shutil.rmtree(tmp, ignore_errors=True)
    _SDK_DIRS[memo_key] = target
    return target
