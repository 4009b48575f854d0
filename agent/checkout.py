"""Check out a task's code into a fresh work directory.

Decisions:

- **Mirror cache.** Each repository URL is cloned once, as a bare repository, into
  `cache_dir/<name>-<sha256(url)[:16]>.git`. Only branches and tags are mirrored
  (`+refs/heads/*` and `+refs/tags/*`), not e.g. GitHub's `refs/pull/*`. A
  `filelock` next to the mirror serialises every operation on it across processes.
  A new mirror is cloned into a temporary directory and renamed into place, so a
  half-finished clone is never mistaken for a mirror.
- **Fetch only when needed.** A pinned commit or a tag already in the mirror is used
  without touching the network (so a pinned task still runs when the remote is down).
  A branch (or the default branch) is always fetched, because its tip moves. A commit
  missing after the fetch is asked for by hash (`git fetch origin <sha>`), which works
  on servers that allow fetching unadvertised commits.
- **Fast per-task copy.** The work directory is a `git clone --shared --no-checkout` of
  the mirror (objects are borrowed through `.git/objects/info/alternates`, nothing is
  copied), then the wanted commit is checked out. Garbage collection is turned off in
  the mirror so objects a running task borrows are never pruned. The work copy's
  `origin` is reset to the real repository URL, so code that inspects its own git
  remote (and relative submodule URLs) sees the real repository.
- **Ref order.** `commit`, else `tag`, else the tip of `branch`, else the default
  branch. A branch checkout creates a local branch of that name; a commit or tag
  checkout is detached.
- **No prompts.** git runs with `GIT_TERMINAL_PROMPT=0`, `GIT_ASKPASS=true`, ssh in
  batch mode and a low-speed abort, so a missing credential fails at once instead of
  hanging. Credentials come from the environment and git's credential helpers.
  Passwords embedded in URLs are masked in every message.
- **Code without a repository.** `script.code` is written to
  `work_dir/<working_dir>/<first word of entry_point, else "script.py">` (the entry
  point may carry arguments: "train.py --lr 0.1"). With a repository, `code` is
  ignored (the `diff` is how local changes travel) and a note is logged.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import filelock
import git

from controller.errors import ConveyorError
from controller.models import Script

#: Default longest time of one git network operation (clone, fetch, submodules).
DEFAULT_GIT_TIMEOUT_S = 1800.0
#: Longest wait for another process holding the same mirror's lock.
DEFAULT_LOCK_TIMEOUT_S = 3600.0

_HEX_RE = re.compile(r"^[0-9a-fA-F]{7,64}$")
_URL_PASSWORD_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")


class CheckoutError(ConveyorError):
    """The task's code could not be checked out; the message names repository and ref."""

    code = "checkout_failed"


@dataclass(frozen=True)
class CheckoutResult:
    """Where to run the step, and the commit that was checked out ("" without a repo)."""

    path_to_run_in: Path
    commit_used: str


def redact_url(text: str) -> str:
    """Mask `user:password@` in URLs inside `text`."""
    return _URL_PASSWORD_RE.sub(r"\g<scheme>***@", text)


def git_environment() -> dict[str, str]:
    """Environment additions that keep git from ever waiting for a human."""
    env = {
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "true",
        "SSH_ASKPASS": "true",
        "GCM_INTERACTIVE": "never",
        "GIT_HTTP_LOW_SPEED_LIMIT": os.environ.get("GIT_HTTP_LOW_SPEED_LIMIT", "1000"),
        "GIT_HTTP_LOW_SPEED_TIME": os.environ.get("GIT_HTTP_LOW_SPEED_TIME", "60"),
    }
    if "GIT_SSH_COMMAND" not in os.environ:
        env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes -o ConnectTimeout=30"
    return env


def _describe_ref(script: Script) -> tuple[str, str]:
    """(kind, value) of the ref to check out; kind is commit/tag/branch/default."""
    for kind in ("commit", "tag", "branch"):
        value = getattr(script, kind).strip()
        if value:
            if value.startswith("-"):
                raise CheckoutError(f"invalid {kind} {value!r}: must not start with '-'")
            return kind, value
    return "default", ""


def _ref_words(kind: str, value: str) -> str:
    return "the default branch" if kind == "default" else f"{kind} {value}"


def _git_error_text(exc: Exception) -> str:
    """The useful part of a git failure: git's stderr, trimmed to a few lines."""
    if isinstance(exc, git.GitCommandError):
        text = exc.stderr if isinstance(exc.stderr, str) else str(exc.stderr or "")
        text = text.strip().removeprefix("stderr:").strip().strip("'").strip()
        if not text:
            text = f"git exited with status {exc.status}"
    else:
        text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return redact_url("; ".join(lines[-4:]))


class _Git:
    """Runs git commands in one directory with the no-prompt environment."""

    def __init__(self, cwd: Path, timeout_s: float):
        self._git = git.Git(str(cwd))
        self._timeout_s = timeout_s

    def __call__(self, *args: str, timeout: bool = False) -> str:
        out = self._git.execute(
            ["git", *args],
            env=git_environment(),
            kill_after_timeout=self._timeout_s if timeout else None,
            stdout_as_string=True,
        )
        return str(out).strip()

    def resolve(self, rev: str) -> str | None:
        """The full hash of the commit `rev` names, or None."""
        try:
            return self("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
        except git.GitCommandError:
            return None


def _mirror_path(cache_dir: Path, url: str) -> Path:
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    base = re.sub(r"\.git$", "", url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1])
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[:40] or "repo"
    return cache_dir / f"{base}-{digest}.git"


def _candidates(kind: str, value: str) -> list[str]:
    if kind == "commit":
        return [value]
    if kind == "tag":
        return [f"refs/tags/{value}"]
    if kind == "branch":
        names = [value]
        for prefix in ("refs/heads/", "origin/", "refs/remotes/origin/"):
            if value.startswith(prefix):
                names.append(value[len(prefix) :])
        return [f"refs/heads/{name}" for name in names]
    return ["HEAD"]


def _resolve(mirror: _Git, kind: str, value: str) -> str | None:
    for rev in _candidates(kind, value):
        sha = mirror.resolve(rev)
        if sha:
            return sha
    return None


def _clone_mirror(
    url: str, mirror_path: Path, timeout_s: float, log: Callable[[str], None]
) -> None:
    for stale in mirror_path.parent.glob(mirror_path.name + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = mirror_path.with_name(f"{mirror_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    log(f"cloning {redact_url(url)} into the repository cache")
    try:
        runner = _Git(mirror_path.parent, timeout_s)
        runner("clone", "--bare", "--quiet", "--", url, str(tmp), timeout=True)
        in_tmp = _Git(tmp, timeout_s)
        in_tmp("config", "remote.origin.fetch", "+refs/heads/*:refs/heads/*")
        in_tmp("config", "--add", "remote.origin.fetch", "+refs/tags/*:refs/tags/*")
        in_tmp("config", "gc.auto", "0")
        in_tmp("config", "maintenance.auto", "false")
        os.rename(tmp, mirror_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _update_mirror(
    url: str, mirror_path: Path, kind: str, value: str, timeout_s: float, log: Callable[[str], None]
) -> str:
    """Make sure the wanted ref is in the mirror (cloning or fetching); return its hash."""
    mirror = _Git(mirror_path, timeout_s)
    if not (mirror_path / "HEAD").exists():
        _clone_mirror(url, mirror_path, timeout_s, log)
    elif kind in ("commit", "tag") and _resolve(mirror, kind, value):
        log(f"using cached {redact_url(url)}: {_ref_words(kind, value)} already present")
    else:
        log(f"fetching {redact_url(url)}")
        mirror("fetch", "--quiet", "--prune", "--force", "origin", timeout=True)
    sha = _resolve(mirror, kind, value)
    if sha is None and kind == "commit" and _HEX_RE.match(value):
        try:
            log(f"fetching commit {value} by hash")
            mirror("fetch", "--quiet", "origin", value, timeout=True)
        except git.GitCommandError:
            pass  # reported below as "not found"
        sha = _resolve(mirror, kind, value)
    if sha is None:
        raise CheckoutError(
            f"cannot check out {_ref_words(kind, value)} of {redact_url(url)}: not found in the repository"
        )
    return sha


def _inside(base: Path, relative: str, what: str) -> Path:
    target = (base / (relative or ".")).resolve()
    if target != base.resolve() and base.resolve() not in target.parents:
        raise CheckoutError(f"{what} {relative!r} points outside the work directory")
    return target


def _prepare_work_dir(work_dir: Path) -> None:
    if work_dir.exists() and any(work_dir.iterdir()):
        raise CheckoutError(f"work directory {work_dir} is not empty")
    work_dir.mkdir(parents=True, exist_ok=True)


def _entry_file_name(entry_point: str) -> str:
    """The file `code` is written to: the entry point's first word (its arguments follow)."""
    try:
        words = shlex.split(entry_point)
    except ValueError:
        words = entry_point.split()
    return words[0] if words and not words[0].startswith("-") else "script.py"


def _write_code(script: Script, work_dir: Path, log: Callable[[str], None]) -> CheckoutResult:
    if script.diff.strip():
        raise CheckoutError("cannot apply the script's diff: the task has no repository")
    run_in = _inside(work_dir, script.working_dir, "working_dir")
    run_in.mkdir(parents=True, exist_ok=True)
    if script.code:
        entry = _inside(run_in, _entry_file_name(script.entry_point), "entry_point")
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text(script.code, encoding="utf-8")
        log(f"wrote the task's code to {entry}")
    else:
        log("the task has neither a repository nor code; running in an empty directory")
    return CheckoutResult(path_to_run_in=run_in, commit_used="")


def _apply_diff(work: _Git, work_dir: Path, diff: str, where: str) -> None:
    patch = work_dir / ".git" / "conveyor-task.diff"
    patch.write_text(diff if diff.endswith("\n") else diff + "\n", encoding="utf-8")
    try:
        work("apply", "--whitespace=nowarn", str(patch))
    except git.GitCommandError as exc:
        raise CheckoutError(
            f"cannot apply the task's diff to {where}: {_git_error_text(exc)}"
        ) from exc
    finally:
        patch.unlink(missing_ok=True)


def checkout_task_code(
    script: Script,
    work_dir: Path,
    cache_dir: Path,
    log: Callable[[str], None],
    *,
    timeout_s: float = DEFAULT_GIT_TIMEOUT_S,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> CheckoutResult:
    """Put the task's code into `work_dir` (which must be missing or empty).

    Returns the directory to run the step in (`work_dir/<script.working_dir>`) and the
    full hash of the commit checked out. Raises CheckoutError naming the repository
    and the ref on any failure.
    """
    work_dir = Path(work_dir)
    _prepare_work_dir(work_dir)
    url = script.repository.strip()
    if not url:
        return _write_code(script, work_dir, log)
    kind, value = _describe_ref(script)
    where = f"{_ref_words(kind, value)} of {redact_url(url)}"
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    mirror_path = _mirror_path(cache_dir, url)
    try:
        with filelock.FileLock(str(mirror_path) + ".lock", timeout=lock_timeout_s):
            sha = _update_mirror(url, mirror_path, kind, value, timeout_s, log)
            where = f"{kind} {sha[:12]} of {redact_url(url)}" if kind == "commit" else where
            _Git(work_dir.parent, timeout_s)(
                "clone",
                "--quiet",
                "--shared",
                "--no-checkout",
                "--",
                str(mirror_path),
                str(work_dir),
            )
        work = _Git(work_dir, timeout_s)
        if kind in ("branch", "default"):
            name = (
                value
                if kind == "branch"
                else _Git(mirror_path, timeout_s)("symbolic-ref", "--short", "HEAD")
            )
            for prefix in ("refs/heads/", "refs/remotes/origin/", "origin/"):
                name = name.removeprefix(prefix)
            work("checkout", "--quiet", "-B", name, sha)
        else:
            work("checkout", "--quiet", "--detach", sha)
        work("remote", "set-url", "origin", url)
        log(f"checked out {_ref_words(kind, value)} at {sha}")
        if script.diff.strip():
            _apply_diff(work, work_dir, script.diff, where)
            log("applied the task's uncommitted changes (diff)")
        if (work_dir / ".gitmodules").exists():
            log("updating submodules")
            work("submodule", "update", "--init", "--recursive", "--quiet", timeout=True)
    except CheckoutError:
        raise
    except filelock.Timeout as exc:
        raise CheckoutError(
            f"cannot check out {where}: repository cache is locked by another process"
        ) from exc
    except (git.GitCommandError, OSError) as exc:
        raise CheckoutError(f"cannot check out {where}: {_git_error_text(exc)}") from exc
    run_in = _inside(work_dir, script.working_dir, "working_dir")
    if not run_in.is_dir():
        raise CheckoutError(f"working_dir {script.working_dir!r} does not exist in {where}")
    if script.code.strip():
        # A task with both (e.g. a pipeline function step with `repo`): the code runs
        # inside the checkout, so it can import the repository's modules.
        entry = _inside(run_in, _entry_file_name(script.entry_point), "entry_point")
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text(script.code, encoding="utf-8")
        log(f"wrote the task's code to {entry} inside the checkout")
    return CheckoutResult(path_to_run_in=run_in, commit_used=sha)
