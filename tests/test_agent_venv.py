"""ensure_venv with real interpreters and a local wheelhouse (no network)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from agent.environments import EnvironmentBuildError, VenvResult, ensure_venv, normalize_packages
from agent.environments.venv import MARKER_NAME


def make_wheel(wheelhouse: Path, name: str, version: str, body: str) -> Path:
    """Write a minimal pure-python wheel by hand (no build backend, no network)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": body,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = (
            base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        )
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    wheel = wheelhouse / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wheels")
    make_wheel(path, "tinypkg", "0.1", "VALUE = 'tiny 0.1'\n")
    make_wheel(path, "tinypkg", "0.2", "VALUE = 'tiny 0.2'\n")
    return path


def offline(wheelhouse: Path) -> list[str]:
    return ["--no-index", "--find-links", str(wheelhouse)]


def in_venv(result: VenvResult, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(result.python_path), "-c", code], capture_output=True, text=True, cwd="/"
    )


def test_build_then_cache_hit(tmp_path: Path, wheelhouse: Path) -> None:
    logs: list[str] = []
    first = ensure_venv(
        sys.executable,
        ["tinypkg==0.1"],
        None,
        tmp_path,
        logs.append,
        index_args=offline(wheelhouse),
    )
    assert not first.cache_hit
    assert any("tinypkg" in line for line in logs), "installer output goes to the log"
    proc = in_venv(first, "import tinypkg, controller.models, pydantic; print(tinypkg.VALUE)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "tiny 0.1"

    # packages the agent has but the SDK does not need stay invisible
    proc = in_venv(first, "import fastapi")
    assert "No module named 'fastapi'" in proc.stderr
    # the venv's own site-packages come before the SDK directory: task packages win
    proc = in_venv(first, "import sys, json; print(json.dumps(sys.path))")
    path = json.loads(proc.stdout)
    site = next(i for i, p in enumerate(path) if p.endswith("site-packages"))
    sdk = next(i for i, p in enumerate(path) if "/sdk/" in p)
    assert site < sdk

    logged_by_the_build = len(logs)
    second = ensure_venv(
        sys.executable,
        ["TinyPkg == 0.1", ""],
        None,
        tmp_path,
        logs.append,
        index_args=offline(wheelhouse),
    )
    assert second.cache_hit and second.path == first.path
    hit_logs = logs[logged_by_the_build:]
    assert any(line.startswith("using cached virtualenv") for line in hit_logs), hit_logs
    assert not [line for line in hit_logs if line.startswith(("building", "$ "))], hit_logs
    first.release()
    second.release()


def test_cache_hit_is_fast_in_a_fresh_process(tmp_path: Path, wheelhouse: Path) -> None:
    ensure_venv(
        sys.executable,
        ["tinypkg==0.1"],
        None,
        tmp_path,
        lambda _: None,
        index_args=offline(wheelhouse),
    ).release()
    code = (
        "import sys, time; from pathlib import Path; from agent.environments import ensure_venv\n"
        f"r = ensure_venv(sys.executable, ['tinypkg==0.1'], None, Path({str(tmp_path)!r}), print)\n"
        "print('RESULT', r.cache_hit, r.python_path)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    *progress, result = out.strip().splitlines()
    _, hit, python = result.split()
    assert hit == "True" and Path(python).is_file()
    assert any(line.startswith("using cached virtualenv") for line in progress), progress
    assert not [line for line in progress if line.startswith(("building", "$ "))], progress


def test_different_inputs_get_different_venvs(tmp_path: Path, wheelhouse: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("tinypkg==0.2\n")
    a = ensure_venv(
        sys.executable, [], req, tmp_path / "cache", lambda _: None, index_args=offline(wheelhouse)
    )
    assert in_venv(a, "import tinypkg; print(tinypkg.VALUE)").stdout.strip() == "tiny 0.2"
    req.write_text("tinypkg==0.1\n")
    b = ensure_venv(
        sys.executable, [], req, tmp_path / "cache", lambda _: None, index_args=offline(wheelhouse)
    )
    assert not b.cache_hit and b.path != a.path
    assert in_venv(b, "import tinypkg; print(tinypkg.VALUE)").stdout.strip() == "tiny 0.1"


def test_install_failure_raises_with_installer_output(tmp_path: Path, wheelhouse: Path) -> None:
    with pytest.raises(EnvironmentBuildError) as info:
        ensure_venv(
            sys.executable,
            ["conveyor-no-such-package==1.0"],
            None,
            tmp_path,
            lambda _: None,
            index_args=offline(wheelhouse),
        )
    message = str(info.value)
    assert message.startswith("installing packages with uv failed (exit code")
    assert "conveyor-no-such-package" in info.value.output
    assert not list((tmp_path / "venvs").glob(f"*/{MARKER_NAME}"))
    assert not [p for p in (tmp_path / "venvs").iterdir() if p.is_dir()], "failed build removed"


def test_missing_python_or_requirements_file(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentBuildError, match="python interpreter 'python9.99' not found"):
        ensure_venv("python9.99", [], None, tmp_path, lambda _: None)
    with pytest.raises(EnvironmentBuildError, match="cannot read requirements file"):
        ensure_venv(sys.executable, [], tmp_path / "nope.txt", tmp_path, lambda _: None)


def test_env_var_index_args(
    tmp_path: Path, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_PIP_ARGS", f"--no-index --find-links {wheelhouse}")
    result = ensure_venv(sys.executable, ["tinypkg"], None, tmp_path, lambda _: None)
    assert in_venv(result, "import tinypkg").returncode == 0


def test_concurrent_requests_build_once(tmp_path: Path, wheelhouse: Path) -> None:
    results: list[VenvResult] = []

    def worker() -> None:
        results.append(
            ensure_venv(
                sys.executable,
                ["tinypkg==0.1"],
                None,
                tmp_path,
                lambda _: None,
                index_args=offline(wheelhouse),
            )
        )

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.cache_hit for r in results) == [False, True, True]
    assert len({r.path for r in results}) == 1


def test_partial_build_is_replaced(tmp_path: Path) -> None:
    first = ensure_venv(sys.executable, [], None, tmp_path, lambda _: None)
    first.release()
    (first.path / MARKER_NAME).unlink()  # as if the build had crashed before publishing
    again = ensure_venv(sys.executable, [], None, tmp_path, lambda _: None)
    assert not again.cache_hit and again.path == first.path
    assert in_venv(again, "import controller").returncode == 0


def test_lru_eviction_spares_venvs_in_use(tmp_path: Path, wheelhouse: Path) -> None:
    logs: list[str] = []
    a = ensure_venv(sys.executable, [], None, tmp_path, logs.append)
    b = ensure_venv(
        sys.executable,
        ["tinypkg==0.1"],
        None,
        tmp_path,
        logs.append,
        index_args=offline(wheelhouse),
        disk_budget_bytes=1,
    )
    assert a.path.exists() and b.path.exists(), "a is in use, b was just built"
    a.release()
    b.release()
    c = ensure_venv(
        sys.executable,
        ["tinypkg==0.2"],
        None,
        tmp_path,
        logs.append,
        index_args=offline(wheelhouse),
        disk_budget_bytes=1,
    )
    assert not a.path.exists() and not b.path.exists() and c.path.exists()
    assert any(line.startswith("evicted virtualenv") for line in logs)
    again = ensure_venv(sys.executable, [], None, tmp_path, logs.append)
    assert not again.cache_hit and again.path == a.path


@pytest.mark.slow
def test_pip_installer(tmp_path: Path, wheelhouse: Path) -> None:
    logs: list[str] = []
    result = ensure_venv(
        sys.executable,
        ["tinypkg==0.2"],
        None,
        tmp_path,
        logs.append,
        index_args=offline(wheelhouse),
        installer="pip",
    )
    proc = in_venv(result, "import tinypkg, controller.models; print(tinypkg.VALUE)")
    assert proc.stdout.strip() == "tiny 0.2", proc.stderr
    created = next(line for line in logs if line.startswith("$ ") and str(result.path) in line)
    assert " -m virtualenv " in created, "without uv the venv is made by virtualenv, not venv + ensurepip"
    assert (tmp_path / "virtualenv").is_dir(), "virtualenv seeds pip from its app-data cache in the cache root"


def test_sdk_check_needs_no_interpreter_when_nothing_shadows_the_sdk(tmp_path: Path, wheelhouse: Path) -> None:
    logs: list[str] = []
    result = ensure_venv(
        sys.executable, ["tinypkg==0.1"], None, tmp_path, logs.append, index_args=offline(wheelhouse)
    )
    assert not any("import controller" in line for line in logs if line.startswith("$ "))
    assert any(line.startswith("Conveyor SDK linked from") for line in logs)
    proc = in_venv(result, "import controller.models, controller.sdk.task, pydantic, sqlalchemy, requests")
    assert proc.returncode == 0, proc.stderr


def test_a_package_at_the_sdks_own_version_is_no_conflict(tmp_path: Path) -> None:
    import importlib.metadata

    from tests.helpers_wheels import wheel_from_installed

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel_from_installed(importlib.metadata.distribution("idna"), wheels)
    logs: list[str] = []
    version = importlib.metadata.version("idna")
    result = ensure_venv(
        sys.executable, [f"idna=={version}"], None, tmp_path, logs.append, index_args=offline(wheels)
    )
    assert not any("import controller" in line for line in logs if line.startswith("$ "))
    assert in_venv(result, "import controller.models, idna").returncode == 0


def test_a_package_shadowing_an_sdk_dependency_is_checked_and_named(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "pydantic", "0.0.1", "raise ImportError('this pydantic is a stub')\n")
    logs: list[str] = []
    with pytest.raises(EnvironmentBuildError) as info:
        ensure_venv(sys.executable, ["pydantic==0.0.1"], None, tmp_path, logs.append, index_args=offline(wheels))
    message = str(info.value)
    assert message.startswith("importing the Conveyor SDK in the new virtualenv failed (exit code 1)")
    assert "the task's packages replace SDK dependencies: pydantic 0.0.1" in message
    assert "this pydantic is a stub" in info.value.output
    assert any("shadow SDK dependencies (pydantic 0.0.1)" in line for line in logs)
    assert not list((tmp_path / "venvs").glob(f"*/{MARKER_NAME}")), "a failed check publishes no venv"


def test_an_sdk_source_without_the_controller_package_fails_the_build(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "controller").mkdir(parents=True)  # no __init__.py: not the SDK
    with pytest.raises(EnvironmentBuildError, match="holds no 'controller' package"):
        ensure_venv(sys.executable, [], None, tmp_path / "cache", lambda _: None, sdk_source=source)


def test_normalize_packages() -> None:
    assert normalize_packages(["Foo_Bar >= 1.0", "# comment", "", "foo-bar>=1.0", "x\ny"]) == [
        "foo-bar>=1.0",
        "x",
        "y",
    ]
    assert normalize_packages(["pkg @ https://example.com/p.whl"]) == [
        "pkg @ https://example.com/p.whl"
    ]
    assert normalize_packages(["a ; python_version < '3.12'"]) == ["a; python_version < '3.12'"]
