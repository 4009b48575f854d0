"""Offline wheelhouses for tests: wheels rebuilt from distributions installed here.

Agent tests need numpy, pandas and Pillow inside step virtualenvs without a network.
The test environment already has them installed, so their files (as listed in each
distribution's RECORD) are packed back into wheels: same versions, same compiled files,
no download. Console scripts are left out (installers regenerate them from
entry_points.txt); the RECORD is rewritten for the packed files.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement

_SKIPPED_DIST_INFO_FILES = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(names: Iterable[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions `names` need, transitively (markers evaluated here)."""
    todo = list(names)
    found: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        name = todo.pop()
        if _canonical(name) in found:
            continue
        dist = importlib.metadata.distribution(name)
        found[_canonical(name)] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return list(found.values())


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_from_installed(dist: importlib.metadata.Distribution, out_dir: Path) -> Path:
    """Pack an installed distribution back into a wheel in `out_dir`."""
    files = [f for f in dist.files or [] if not str(f).startswith("..")]
    dist_info = next(f.parts[0] for f in files if f.parts[0].endswith(".dist-info"))
    base = Path(str(dist.locate_file("")))
    wheel_meta = (base / dist_info / "WHEEL").read_text()
    tags = [t.split("-") for t in re.findall(r"^Tag:\s*(\S+)", wheel_meta, re.M)]
    # The compressed tag set of the file name ("py2.py3-none-any").
    tag = "-".join(".".join(dict.fromkeys(t[i] for t in tags)) for i in range(3))
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    target = out_dir / f"{name}-{dist.version}-{tag}.whl"
    if target.exists():
        return target
    record: list[str] = []
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for f in files:
            parts = f.parts
            if "__pycache__" in parts or str(f).endswith(".pyc"):
                continue
            if parts[0] == dist_info and parts[-1] in _SKIPPED_DIST_INFO_FILES:
                continue
            path = base / f
            if not path.is_file():
                continue
            data = path.read_bytes()
            arcname = f.as_posix()
            zf.writestr(arcname, data)
            record.append(f"{arcname},{_record_hash(data)},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    tmp.rename(target)
    return target


def offline_wheelhouse(requirements: Iterable[str], out_dir: Path) -> Path:
    """A folder of wheels for `requirements` and everything they need, made offline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for dist in requirement_closure(requirements):
        wheel_from_installed(dist, out_dir)
    return out_dir
