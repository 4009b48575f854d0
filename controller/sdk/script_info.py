"""What `Task.init` and `Task.create` record about a script: its code and its packages.

Decisions:

- **Git.** When the script is inside a git work tree (asked with the `git` command, which
  Conveyor needs anyway), the task records the repository (the URL of the remote
  "origin", else of the first remote, with any credentials removed; a repository
  without remotes is recorded by its local path, usable by agents on the same machine),
  the branch, the commit of HEAD and `git diff HEAD --binary` (uncommitted changes to
  tracked files; untracked files are not included). A diff larger than the store's text
  limit is left out with a warning. The working directory is the current directory
  when it lies inside the repository (else the script's folder), and the entry point is
  the script relative to it, followed by the script's command line arguments, or
  `-m module args` for `python -m module`.
- **No git.** The task records the script's code (`script.code`) and its file name.
- **Packages.** Every `import x` / `from x import ...` in the script (the whole file,
  imports inside functions included; relative imports and local modules next to the
  script skipped) is mapped to the installed distribution providing `x`
  (`importlib.metadata.packages_distributions()`) and pinned to its installed version
  (`name==version`). The standard library, Conveyor itself (`controller`, `agent`) and
  modules no installed distribution provides are left out. Only the entry script is
  scanned, not the modules it imports from its own repository.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.models import MAX_TEXT_CHARS

#: Top-level modules never listed as packages (Conveyor's own).
SDK_MODULES = frozenset({"controller", "agent"})
SDK_DISTRIBUTIONS = frozenset({"conveyor"})
GIT_TIMEOUT_S = 30.0


@dataclass
class GitInfo:
    """Where a work tree's code comes from."""

    root: Path
    repository: str
    branch: str
    commit: str
    diff: str


def _git(cwd: Path, *args: str) -> str | None:
    """Output of a git command in `cwd`, or None if git fails (or is missing)."""
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def strip_credentials(url: str) -> str:
    """A remote URL without user:password@ (tokens must not be stored in tasks)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@", r"\1", url)


def git_info(folder: Path, *, with_diff: bool = True) -> GitInfo | None:
    """The repository, branch, commit and diff of the work tree holding `folder`."""
    folder = folder if folder.is_dir() else folder.parent
    top = _git(folder, "rev-parse", "--show-toplevel")
    if not top:
        return None
    root = Path(top.strip()).resolve()
    commit = (_git(root, "rev-parse", "HEAD") or "").strip()
    if not commit:
        return None  # a repository without commits: nothing an agent could check out
    branch = (_git(root, "symbolic-ref", "--short", "-q", "HEAD") or "").strip()
    remotes = (_git(root, "remote") or "").split()
    repository = str(root)
    if remotes:
        remote = "origin" if "origin" in remotes else remotes[0]
        url = (_git(root, "remote", "get-url", remote) or "").strip()
        if url:
            repository = strip_credentials(url)
    diff = ""
    if with_diff:
        diff = _git(root, "diff", "HEAD", "--binary") or ""
        if len(diff) > MAX_TEXT_CHARS:
            print(
                f"conveyor: the uncommitted changes of {root} ({len(diff)} characters) are too "
                "large to record; the task records the commit without them",
                file=sys.stderr,
            )
            diff = ""
    return GitInfo(root, repository, branch, commit, diff)


# ---------------------------------------------------------------------- packages
def imported_modules(source: str) -> set[str]:
    """Top-level names of the absolute imports in Python `source` (empty if unparsable)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@functools.lru_cache(maxsize=1)
def module_providers() -> Mapping[str, list[str]]:
    """Top-level module → the distributions providing it, read once per process (a scan
    of every installed distribution's files: ~0.4 s, and a pipeline asks once per step)."""
    return importlib.metadata.packages_distributions()


def packages_for_modules(modules: set[str], local_dirs: tuple[Path, ...] = ()) -> list[str]:
    """Pinned requirements (`name==version`) of the distributions providing `modules`."""
    providers = module_providers()
    pinned: dict[str, str] = {}
    for module in sorted(modules):
        if module in sys.stdlib_module_names or module in SDK_MODULES or module == "__future__":
            continue
        if any((d / f"{module}.py").exists() or (d / module / "__init__.py").exists() for d in local_dirs):
            continue
        for dist_name in providers.get(module, []):
            try:
                dist = importlib.metadata.distribution(dist_name)
            except importlib.metadata.PackageNotFoundError:
                continue
            name = dist.metadata["Name"] or dist_name
            if name.lower() in SDK_DISTRIBUTIONS:
                continue
            pinned[name.lower()] = f"{name}=={dist.version}"
    return [pinned[k] for k in sorted(pinned)]


def detect_packages(script: Path) -> list[str]:
    """The pinned packages `script` imports (see the module docstring)."""
    try:
        source = script.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return packages_for_modules(imported_modules(source), (script.resolve().parent,))


# ------------------------------------------------------------------- the script
def main_script() -> tuple[Path | None, str | None]:
    """The file `python` runs now, and the module name for `python -m module`."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    module = spec.name if spec is not None and spec.name not in ("__main__", None) else None
    if module and module.endswith(".__main__"):
        module = module[: -len(".__main__")]
    if not path:
        return None, None
    return Path(path).resolve(), module


def describe_running_script(argv: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """(script fields, packages) of the process's main script, for `Task.init`."""
    script, module = main_script()
    args = list(sys.argv[1:] if argv is None else argv)
    if script is None or not script.is_file():
        return {"entry_point": "", "code": ""}, []
    packages = detect_packages(script)
    info = git_info(script.parent)
    if info is None:
        entry = shlex.join([script.name, *args])
        return {"code": script.read_text(encoding="utf-8", errors="replace"), "entry_point": entry,
                "working_dir": "."}, packages
    cwd = Path.cwd().resolve()
    run_in = cwd if cwd.is_relative_to(info.root) else script.parent
    if module:
        entry = shlex.join(["-m", module, *args])
    else:
        entry = shlex.join([os.path.relpath(script, run_in), *args])
    fields = {
        "repository": info.repository,
        "branch": info.branch,
        "commit": info.commit,
        "diff": info.diff,
        "entry_point": entry,
        "working_dir": run_in.relative_to(info.root).as_posix() or ".",
    }
    return fields, packages


def _relative_script(script: str | os.PathLike[str], root: Path, what: str) -> Path:
    path = Path(script).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{what}: the script {script} is not inside the repository {root}")
    return path.relative_to(root)


def script_for_create(
    repo: str | None,
    branch: str | None,
    commit: str | None,
    script: str | None,
    working_directory: str | None,
    *,
    single_file: bool = False,
) -> tuple[dict[str, Any], Path | None]:
    """The script fields of `Task.create`, and the local script file (None if remote).

    `script` is relative to the repository root (or a path inside a local repository);
    `working_directory` (default: the root) is where it runs, relative to the root; the
    entry point is the script relative to it. A local repository without `branch` and
    `commit` is pinned to its current branch, HEAD commit and uncommitted changes; with
    a `branch` only, the agent runs that branch's tip.
    """
    what = "Task.create"
    run_in = Path(working_directory or ".")
    if run_in.is_absolute() or ".." in run_in.parts:
        raise ValueError(f"{what}: working_directory {working_directory!r} must be relative to the repository")
    local_repo = Path(repo).expanduser() if repo else None
    if repo and local_repo is not None and local_repo.is_dir():
        info = git_info(local_repo)
        if info is None:
            raise ValueError(f"{what}: {repo} is not a git repository with at least one commit")
        if not script:
            raise ValueError(f"{what}: give the script to run inside the repository {repo}")
        rel = _relative_script(script, info.root.resolve(), what)
        pinned = not branch and not commit
        fields = {
            "repository": info.repository,
            "branch": branch or (info.branch if not commit else ""),
            "commit": commit or (info.commit if pinned else ""),
            "diff": info.diff if pinned else "",
        }
        local_script: Path | None = info.root / rel
    elif repo:
        if not script:
            raise ValueError(f"{what}: give the script to run inside the repository {repo}")
        rel = Path(script)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{what}: script {script!r} must be a path inside the repository {repo}")
        fields = {"repository": strip_credentials(repo), "branch": branch or "", "commit": commit or ""}
        local_script = None
    else:
        if not script:
            raise ValueError(f"{what}: give a script (a local file) or a repo and a script in it")
        path = Path(script).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no such script: {script}")
        info = None if single_file else git_info(path.parent)
        if info is None:
            return {"code": path.read_text(encoding="utf-8"), "entry_point": path.name,
                    "working_dir": run_in.as_posix()}, path
        return script_for_create(str(info.root), branch, commit, str(path), working_directory)
    fields["entry_point"] = Path(os.path.relpath(rel, run_in)).as_posix()
    fields["working_dir"] = run_in.as_posix()
    return fields, local_script
