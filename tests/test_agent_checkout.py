"""checkout_task_code against real git repositories made in the test (no network)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import git
import pytest

from agent.checkout import CheckoutError, checkout_task_code, redact_url
from controller.models import Script


def run(path: Path, entry: str = "main.py") -> str:
    return subprocess.run(
        [sys.executable, entry], cwd=path, capture_output=True, text=True, check=True
    ).stdout.strip()


def commit(repo: git.Repo, text: str, message: str) -> str:
    Path(repo.working_tree_dir, "main.py").write_text(f"print({text!r})\n")
    repo.index.add(["main.py"])
    return repo.index.commit(message).hexsha


@pytest.fixture()
def origin(tmp_path: Path) -> dict[str, str]:
    """An origin repo: main has v1 → v2, branch `feature` has v3, tag `v1.0` on v1."""
    path = tmp_path / "origin"
    repo = git.Repo.init(path, initial_branch="main")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "Test")
        cfg.set_value("user", "email", "test@example.com")
    first = commit(repo, "v1", "first")
    repo.create_tag("v1.0")
    (path / "sub").mkdir()
    (path / "sub" / "tool.py").write_text("print('tool')\n")
    repo.index.add(["sub/tool.py"])
    repo.index.commit("add sub")
    repo.create_head("feature").checkout()
    feature = commit(repo, "v3", "feature")
    repo.heads.main.checkout()
    return {"url": str(path), "first": first, "feature": feature}


def checkout(script: Script, tmp_path: Path, name: str, log: list[str] | None = None):
    logs = log if log is not None else []
    return checkout_task_code(script, tmp_path / "work" / name, tmp_path / "cache", logs.append)


def test_branch_tag_commit_and_default(origin: dict[str, str], tmp_path: Path) -> None:
    url = origin["url"]
    res = checkout(Script(repository=url, branch="main"), tmp_path, "a")
    assert run(res.path_to_run_in) == "v1"
    assert res.commit_used == git.Repo(url).heads.main.commit.hexsha

    # the branch moves on in the origin
    second = commit(git.Repo(url), "v2", "second")
    res = checkout(Script(repository=url, branch="main"), tmp_path, "b")
    assert run(res.path_to_run_in) == "v2" and res.commit_used == second
    assert git.Repo(res.path_to_run_in).active_branch.name == "main"

    # pinned to the first commit: still runs the first commit's code
    res = checkout(Script(repository=url, branch="main", commit=origin["first"]), tmp_path, "c")
    assert run(res.path_to_run_in) == "v1" and res.commit_used == origin["first"]

    # an abbreviated hash works too
    res = checkout(Script(repository=url, commit=origin["first"][:10]), tmp_path, "c2")
    assert res.commit_used == origin["first"]

    res = checkout(Script(repository=url, tag="v1.0", branch="main"), tmp_path, "d")
    assert run(res.path_to_run_in) == "v1" and res.commit_used == origin["first"]

    res = checkout(Script(repository=url, branch="feature"), tmp_path, "e")
    assert run(res.path_to_run_in) == "v3" and res.commit_used == origin["feature"]

    res = checkout(Script(repository=url), tmp_path, "f")  # the default branch
    assert run(res.path_to_run_in) == "v2"

    # the work copy's origin is the real repository, not the cache
    assert git.Repo(res.path_to_run_in).remotes.origin.url == url
    assert len(list((tmp_path / "cache").glob("*.git"))) == 1


def test_pinned_commit_does_not_need_the_remote(origin: dict[str, str], tmp_path: Path) -> None:
    checkout(Script(repository=origin["url"], branch="main"), tmp_path, "a")
    moved = tmp_path / "origin-moved"
    Path(origin["url"]).rename(moved)  # the remote is gone
    logs: list[str] = []
    res = checkout(Script(repository=origin["url"], commit=origin["first"]), tmp_path, "b", logs)
    assert run(res.path_to_run_in) == "v1"
    assert not any(line.startswith("fetching") for line in logs)
    with pytest.raises(CheckoutError, match="branch main of"):
        checkout(Script(repository=origin["url"], branch="main"), tmp_path, "c")


def test_diff_is_applied(origin: dict[str, str], tmp_path: Path) -> None:
    diff = (
        "diff --git a/main.py b/main.py\n"
        "--- a/main.py\n"
        "+++ b/main.py\n"
        "@@ -1 +1 @@\n"
        "-print('v1')\n"
        "+print('patched')\n"
    )
    res = checkout(
        Script(repository=origin["url"], commit=origin["first"], diff=diff), tmp_path, "a"
    )
    assert run(res.path_to_run_in) == "patched"
    with pytest.raises(CheckoutError, match="cannot apply the task's diff to branch feature of"):
        checkout(Script(repository=origin["url"], branch="feature", diff=diff), tmp_path, "b")


def test_working_dir(origin: dict[str, str], tmp_path: Path) -> None:
    res = checkout(
        Script(repository=origin["url"], branch="main", working_dir="sub"), tmp_path, "a"
    )
    assert res.path_to_run_in == (tmp_path / "work" / "a" / "sub").resolve()
    assert run(res.path_to_run_in, "tool.py") == "tool"
    with pytest.raises(CheckoutError, match="working_dir 'nope' does not exist in branch main"):
        checkout(Script(repository=origin["url"], branch="main", working_dir="nope"), tmp_path, "b")
    with pytest.raises(CheckoutError, match="outside the work directory"):
        checkout(
            Script(repository=origin["url"], branch="main", working_dir="../.."), tmp_path, "c"
        )


@pytest.mark.parametrize(
    ("script", "words"),
    [
        (
            Script(commit="0123456789abcdef0123456789abcdef01234567"),
            "cannot check out commit 0123456789abcdef0123456789abcdef01234567 of ",
        ),
        (Script(tag="no-such-tag"), "cannot check out tag no-such-tag of "),
        (Script(branch="no-such-branch"), "cannot check out branch no-such-branch of "),
    ],
)
def test_bad_ref_names_repo_and_ref(
    origin: dict[str, str], tmp_path: Path, script: Script, words: str
) -> None:
    script = script.model_copy(update={"repository": origin["url"]})
    with pytest.raises(CheckoutError) as info:
        checkout(script, tmp_path, "a")
    assert str(info.value).startswith(words + origin["url"])
    assert "\n" not in str(info.value)


def test_bad_repository(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-repo")
    with pytest.raises(CheckoutError) as info:
        checkout(Script(repository=missing, branch="main"), tmp_path, "a")
    assert str(info.value).startswith(f"cannot check out branch main of {missing}: ")
    left = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert left == [], "no half-made mirror is left"


def test_code_without_repository(tmp_path: Path) -> None:
    res = checkout(Script(code="print('from code')\n", entry_point="job.py"), tmp_path, "a")
    assert res.commit_used == ""
    assert run(res.path_to_run_in, "job.py") == "from code"
    res = checkout(Script(code="print('with args')\n", entry_point="run.py --n 1"), tmp_path, "a2")
    assert run(res.path_to_run_in, "run.py") == "with args"
    res = checkout(Script(code="print('default name')\n"), tmp_path, "b")
    assert run(res.path_to_run_in, "script.py") == "default name"
    with pytest.raises(CheckoutError, match="no repository"):
        checkout(Script(code="x", diff="y"), tmp_path, "c")


def test_work_dir_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "work" / "a").mkdir(parents=True)
    (tmp_path / "work" / "a" / "junk").write_text("x")
    with pytest.raises(CheckoutError, match="not empty"):
        checkout(Script(code="x"), tmp_path, "a")


def test_option_like_ref_is_refused(origin: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(CheckoutError, match="must not start with '-'"):
        checkout(
            Script(repository=origin["url"], branch="--upload-pack=touch /tmp/x"), tmp_path, "a"
        )


def test_redact_url() -> None:
    assert redact_url("https://user:s3cret@host/repo.git") == "https://***@host/repo.git"
    assert redact_url("git@github.com:org/repo.git") == "git@github.com:org/repo.git"


def test_concurrent_checkouts_share_one_mirror(origin: dict[str, str], tmp_path: Path) -> None:
    import threading

    results, errors = [], []

    def worker(name: str) -> None:
        try:
            results.append(
                checkout(Script(repository=origin["url"], branch="feature"), tmp_path, name)
            )
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert {r.commit_used for r in results} == {origin["feature"]}
    assert all(run(r.path_to_run_in) == "v3" for r in results)
    assert len(list((tmp_path / "cache").glob("*.git"))) == 1
