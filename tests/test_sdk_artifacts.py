"""Artifacts, output models and storage from the SDK, on the embedded store and over HTTP.

The cross-machine round trip of every artifact type through agents is in
test_sdk_agent_e2e.py; these tests cover the records, the errors and the storage paths.
"""

from __future__ import annotations

import hashlib
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller import OutputModel, StorageManager, Task
from controller.sdk.storage import StorageError
from tests.helpers_server import start_server, stop_server

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One `controller serve` process with an API token for this module: (url, files dir)."""
    root = tmp_path_factory.mktemp("server")
    proc, url = start_server(
        f"sqlite:///{root / 'conveyor.db'}", TOKEN, extra_args=["--files-dir", str(root / "files")]
    )
    yield url, root / "files"
    stop_server(proc)


@pytest.fixture(params=["sqlite", "http"])
def api_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """CONVEYOR_API (and token) for the SDK: the embedded store, or the module's server."""
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
    else:
        url = request.getfixturevalue("server")[0]
        monkeypatch.setenv("CONVEYOR_API_TOKEN", TOKEN)
    monkeypatch.setenv("CONVEYOR_API", url)
    return url


@pytest.fixture
def task(api_url: str, tmp_path: Path) -> Task:
    script = tmp_path / "step.py"
    script.write_text("print('hi')\n")
    return Task.create(project_name="proj", task_name="artifacts", script=str(script))


# ------------------------------------------------------------------- records
def test_an_artifact_records_url_size_sha256_type_and_metadata(task: Task, api_url: str, tmp_path: Path) -> None:
    task.upload_artifact("stats", {"rows": 3, "names": ["a", "b"]}, metadata={"source": "unit"})
    artifact = Task.get_task(task_id=task.id).artifacts["stats"]
    local = Path(artifact.get_local_copy())
    assert artifact.type == "dict"
    assert artifact.size == local.stat().st_size
    assert artifact.hash == hashlib.sha256(local.read_bytes()).hexdigest()
    assert artifact.metadata == {"source": "unit"}
    assert artifact.get() == {"rows": 3, "names": ["a", "b"]}
    local_file = (tmp_path / "home" / "files" / "proj" / task.id / "artifacts" / "stats" / "stats.json").as_uri()
    if api_url.startswith("http"):
        # The record names the server's files area, not the address this process used
        # (any host reads it); people and outside code get the server's address.
        assert artifact.url == f"conveyor://files/proj/{task.id}/artifacts/stats/stats.json"
        assert artifact.public_url == f"{api_url}/api/v1/files/proj/{task.id}/artifacts/stats/stats.json"
    else:  # the embedded store: this machine's files area, by its absolute path
        assert artifact.url == artifact.public_url == local_file


def test_an_artifact_uploaded_again_under_its_name_is_fetched_again(task: Task) -> None:
    task.upload_artifact("data", "first version")
    assert task.artifacts["data"].get() == "first version"
    task.upload_artifact("data", "second version")  # same URL, new content
    assert task.artifacts["data"].get() == "second version"


def test_a_missing_artifact_names_itself_and_the_existing_ones(task: Task) -> None:
    task.upload_artifact("model", {"a": 1})
    task.upload_artifact("dataset", "text")
    with pytest.raises(KeyError, match=r"has no artifact 'modle' \(its artifacts: dataset, model\)"):
        task.artifacts["modle"]


def test_an_unpicklable_object_is_refused_naming_the_artifact(task: Task) -> None:
    with pytest.raises(ValueError, match=r"artifact 'lock': cannot pickle the object of type lock"):
        task.upload_artifact("lock", threading.Lock())
    with pytest.raises(ValueError, match=r"artifact 'obj': objects of type object are not a supported"):
        task.upload_artifact("obj", object(), auto_pickle=False)
    assert "lock" not in task.artifacts


@pytest.mark.parametrize("name", ["", "..", ".", "../escape", "a/b", "a\\b", "tab\there"])
def test_artifact_names_that_could_leave_their_folder_are_refused(task: Task, name: str) -> None:
    with pytest.raises(ValueError, match="invalid artifact name"):
        task.upload_artifact(name, {"x": 1})
    assert len(task.artifacts) == 0


def test_a_missing_file_is_refused_naming_it(task: Task, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="artifact 'data': no such file or folder: .*missing.csv"):
        task.upload_artifact("data", tmp_path / "missing.csv")


def test_output_uri_sends_artifacts_and_models_elsewhere(task: Task, tmp_path: Path) -> None:
    task.output_uri = str(tmp_path / "bucket")
    task.upload_artifact("numbers", [1, 2, 3])
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"\x00weights")
    OutputModel(task=task, name="net", framework="pytorch").update_weights(weights_filename=str(weights))
    bucket = (tmp_path / "bucket").as_uri()
    assert task.artifacts["numbers"].url.startswith(bucket + "/proj/")
    assert task.artifacts["numbers"].get() == [1, 2, 3]
    model = task.models["output"][-1]
    assert (model.name, model.framework) == ("net", "pytorch")
    assert model.url.startswith(bucket) and model.url.endswith("/models/net/w.bin")
    assert Path(model.get_local_copy()).read_bytes() == b"\x00weights"


def test_the_last_output_model_is_the_last_one_created(task: Task, tmp_path: Path) -> None:
    for name in ("first", "second"):
        path = tmp_path / f"{name}.pt"
        path.write_bytes(name.encode())
        OutputModel(task=task, name=name).update_weights(str(path))
    models = Task.get_task(task_id=task.id).models["output"]
    assert [m.name for m in models] == ["first", "second"]
    assert Path(models[-1].get_local_copy()).read_bytes() == b"second"
    # What a pipeline's ${step.models.output.-1.url} reads from the record:
    assert task.reload().data.models["output"][-1].url == models[-1].url
    assert models["first"].url.endswith("/first.pt")


def test_tables_are_stored_as_artifacts(task: Task) -> None:
    task.get_logger().report_table("metrics", "per class", 0, table_plot=[["class", "f1"], ["cat", 0.9]])
    artifact = task.artifacts["table: metrics - per class"]
    assert Path(artifact.get()).read_text().splitlines() == ["class,f1", "cat,0.9"]
    assert artifact.metadata == {"title": "metrics", "series": "per class", "iteration": 0}


# ------------------------------------------------------------------ storage
def test_local_paths_and_file_urls_are_returned_in_place(tmp_path: Path) -> None:
    path = tmp_path / "data dir" / "x.txt"
    path.parent.mkdir()
    path.write_text("x")
    assert StorageManager.get_local_copy(str(path)) == str(path)
    assert StorageManager.get_local_copy(path.as_uri()) == str(path)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        StorageManager.get_local_copy(str(tmp_path / "nope.txt"))


def test_a_zip_is_extracted_into_the_cache(tmp_path: Path) -> None:
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("inner/a.txt", "A")
    folder = Path(StorageManager.get_local_copy(str(archive)))
    assert (folder / "inner" / "a.txt").read_text() == "A"
    assert folder.is_relative_to(tmp_path / "home" / "cache" / "storage")
    assert StorageManager.get_local_copy(str(archive), extract_archive=False) == str(archive)


def test_any_installed_fsspec_protocol_works(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("through fsspec")
    url = StorageManager.upload_file(str(source), "memory://bucket/dir/in.txt")
    assert url == "memory://bucket/dir/in.txt"
    assert Path(StorageManager.get_local_copy(url)).read_text() == "through fsspec"
    with pytest.raises(StorageError, match="nosuchproto://x/y"):
        StorageManager.get_local_copy("nosuchproto://x/y")


def test_the_files_endpoint_is_read_with_the_api_token(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, files_dir = server
    monkeypatch.setenv("CONVEYOR_API", url)
    monkeypatch.setenv("CONVEYOR_API_TOKEN", TOKEN)
    source = tmp_path / "report.txt"
    source.write_text("secret report")
    stored = StorageManager.upload_file(str(source), f"{url}/api/v1/files/shared/{tmp_path.name}.txt")
    assert (files_dir / "shared" / f"{tmp_path.name}.txt").read_text() == "secret report"
    assert Path(StorageManager.get_local_copy(stored)).read_text() == "secret report"
    with pytest.raises(FileNotFoundError, match="HTTP 404"):
        StorageManager.get_local_copy(f"{url}/api/v1/files/shared/nope.txt")
    monkeypatch.delenv("CONVEYOR_API_TOKEN")
    with pytest.raises(StorageError, match="HTTP 401, .* set CONVEYOR_API_TOKEN"):
        StorageManager.get_local_copy(stored, force_download=True)


# ------------------------------------------------- location-independent references
def test_records_of_older_versions_are_read_by_their_path(
    server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An artifact recorded as http://<another address>/api/v1/files/... (what versions
    before conveyor:// references stored) is read from this process's CONVEYOR_API."""
    url, files_dir = server
    monkeypatch.setenv("CONVEYOR_API", url)
    monkeypatch.setenv("CONVEYOR_API_TOKEN", TOKEN)
    script = tmp_path / "step.py"
    script.write_text("print('hi')\n")
    task = Task.create(project_name="proj", task_name="old", script=str(script))
    task.upload_artifact("data", {"old": True})
    path = f"proj/{task.id}/artifacts/data/data.json"
    old_url = f"http://10.255.255.1:1/api/v1/files/{path}"  # nobody listens there
    record = task.artifacts["data"]
    task._backend.edit_task(task.id, {"artifacts": {"data": {
        "uri": old_url, "type": "dict", "size": record.size, "sha256": record.hash,
    }}}, force=True)
    again = Task.get_task(task_id=task.id).artifacts["data"]
    assert again.url == old_url
    assert again.get() == {"old": True}
    assert again.public_url == f"{url}/api/v1/files/{path}"
    assert Path(StorageManager.get_local_copy(f"conveyor://files/{path}")).read_text() == (
        files_dir / path
    ).read_text()


def test_storage_manager_stores_to_the_files_area_by_reference(
    api_url: str, tmp_path: Path
) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("shared notes")
    ref = StorageManager.upload_file(str(source), f"conveyor://files/shared/{tmp_path.name}.txt")
    assert ref == f"conveyor://files/shared/{tmp_path.name}.txt"
    assert Path(StorageManager.get_local_copy(ref)).read_text() == "shared notes"
    with pytest.raises(StorageError, match="invalid files-area path"):
        StorageManager.get_local_copy("conveyor://files/shared/../../etc/passwd")


def test_the_public_url_is_what_the_server_was_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc, url = start_server(
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        extra_args=["--files-dir", str(tmp_path / "files"), "--public-url", "http://conveyor.example:8008/"],
    )
    try:
        monkeypatch.setenv("CONVEYOR_API", url)
        script = tmp_path / "step.py"
        script.write_text("print('hi')\n")
        task = Task.create(project_name="proj", task_name="public", script=str(script))
        task.upload_artifact("note", "hello")
        artifact = task.artifacts["note"]
        path = f"proj/{task.id}/artifacts/note/note.txt"
        assert artifact.url == f"conveyor://files/{path}"
        assert artifact.public_url == f"http://conveyor.example:8008/api/v1/files/{path}"
        model = OutputModel(task=task, name="net")
        weights = tmp_path / "w.bin"
        weights.write_bytes(b"w")
        model.update_weights(str(weights))
        entry = task.reload().models["output"][-1]
        assert entry.public_url == f"http://conveyor.example:8008/api/v1/files/proj/{task.id}/models/net/w.bin"
    finally:
        stop_server(proc)


# ------------------------------------------------------------ files follow tasks
def _run_cli(*args: str, env: dict[str, str]) -> str:
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "controller.cli", *args], env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_deleting_a_task_removes_its_files_and_gc_removes_orphans(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, files_dir = server
    monkeypatch.setenv("CONVEYOR_API", url)
    monkeypatch.setenv("CONVEYOR_API_TOKEN", TOKEN)
    script = tmp_path / "step.py"
    script.write_text("print('hi')\n")
    kept = Task.create(project_name="gcproj", task_name="kept", script=str(script))
    gone = Task.create(project_name="gcproj", task_name="gone", script=str(script))
    for task in (kept, gone):
        task.upload_artifact("data", {"task": task.id})
    assert (files_dir / "gcproj" / gone.id).is_dir()
    out = _run_cli("tasks", "delete", gone.id, env={"CONVEYOR_API": url, "CONVEYOR_API_TOKEN": TOKEN})
    assert f"Deleted task {gone.id}" in out
    assert not (files_dir / "gcproj" / gone.id).exists()
    assert kept.artifacts["data"].get() == {"task": kept.id}
    # A folder whose task is gone another way (e.g. deleted straight in the database):
    orphan = files_dir / "gcproj" / ("f" * 32) / "artifacts" / "x"
    orphan.mkdir(parents=True)
    (orphan / "x.txt").write_text("left behind")
    (files_dir / "shared-by-hand.txt").write_text("not a task's")
    env = {"CONVEYOR_API": url, "CONVEYOR_API_TOKEN": TOKEN}
    dry = _run_cli("files", "gc", "--files-dir", str(files_dir), "--dry-run", env=env)
    assert "Would remove 1 folder(s)" in dry and orphan.exists()
    out = _run_cli("files", "gc", "--files-dir", str(files_dir), env=env)
    assert f"Removed {files_dir / 'gcproj' / ('f' * 32)}" in out
    assert not (files_dir / "gcproj" / ("f" * 32)).exists()
    assert (files_dir / "gcproj" / kept.id).is_dir()
    assert (files_dir / "shared-by-hand.txt").is_file()
