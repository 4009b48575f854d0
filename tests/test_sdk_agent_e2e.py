"""The step SDK through real agents: artifacts and connected parameters cross steps.

Each test runs on the embedded store and over HTTP. Over HTTP the agent has its own
CONVEYOR_HOME and the server its own files folder, as on separate machines: artifacts
must travel through the server's files endpoint. Steps that use numpy, pandas and
Pillow list them as packages; the agent installs them offline from wheels rebuilt from
this environment's installed copies (tests/helpers_wheels.py).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller import Task
from controller.backend import Backend
from controller.connect import backend_from_url
from tests.helpers_server import start_server, stop_server
from tests.helpers_wheels import offline_wheelhouse

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "e2e-token"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
try:
    DATA_PACKAGES = [f"{name}=={importlib.metadata.version(name)}" for name in ("numpy", "pandas", "pillow")]
except importlib.metadata.PackageNotFoundError as missing:  # the test extras are not installed
    if IN_CI:
        raise RuntimeError(f"{missing.name} is missing: install the test extras (pip install -e '.[test]')") from None
    pytest.skip(f"{missing.name} is not installed (pip install -e '.[test]')", allow_module_level=True)

COMMON = '''\
"""Objects both steps agree on, and how to compare what came back."""
import numpy as np
import pandas as pd
from PIL import Image

FILE_BYTES = bytes(range(256)) * 4
TREE = {"a.txt": "A", "sub/b.txt": "B"}
CUSTOM = ["x", "y", "z"]


class Point:  # pickled: the consumer unpickles it from this shared module
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def image():
    img = Image.new("RGB", (8, 6), (10, 200, 30))
    img.putpixel((3, 2), (255, 0, 0))
    return img


def objects():
    return {
        "dict": {"rows": 3, "nested": {"names": ["a", "b"], "ratio": 0.25}},
        "dataframe": pd.DataFrame({"n": [1, 2, 3], "x": [0.5, 1.5, 2.5], "s": ["a", "b", "c"]}),
        "array": np.arange(12, dtype=np.float32).reshape(3, 4),
        "image": image(),
        "text": "hello, conveyor",
        "point": Point(1, 2),
    }


def same(got, want):
    if isinstance(want, pd.DataFrame):
        return isinstance(got, pd.DataFrame) and got.equals(want)
    if isinstance(want, np.ndarray):
        return isinstance(got, np.ndarray) and got.dtype == want.dtype and np.array_equal(got, want)
    if isinstance(want, Image.Image):
        return (got.mode, got.size, got.tobytes()) == (want.mode, want.size, want.tobytes())
    return type(got) is type(want) and got == want


def serialize(items):
    return "|".join(items).encode()


def deserialize(data):
    return data.decode().split("|")


def tree_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}
'''

PRODUCER = '''\
from pathlib import Path

import common
from controller import Task

task = Task.init("sdk-e2e", "producer")
inputs = Path("inputs")
(inputs / "tree" / "sub").mkdir(parents=True)
(inputs / "data.bin").write_bytes(common.FILE_BYTES)
for name, text in common.TREE.items():
    (inputs / "tree" / name).write_text(text)
task.upload_artifact("file", str(inputs / "data.bin"))
task.upload_artifact("folder", inputs / "tree")
for name, obj in common.objects().items():
    task.upload_artifact(name, obj)
task.upload_artifact("custom", common.CUSTOM, serialization_function=common.serialize)
print("uploaded", len(task.artifacts), "artifacts", flush=True)
'''

CONSUMER = '''\
import json
from pathlib import Path

import common
from controller import Task

task = Task.init("sdk-e2e", "consumer")
args = task.connect({"producer_id": ""})
source = Task.get_task(task_id=args["producer_id"])
artifacts = source.artifacts
results = {
    "file": Path(artifacts["file"].get()).read_bytes() == common.FILE_BYTES,
    "folder": common.tree_of(Path(artifacts["folder"].get_local_copy())) == common.TREE,
    "custom": artifacts["custom"].get(deserialization_function=common.deserialize) == common.CUSTOM,
}
for name, want in common.objects().items():
    results[name] = common.same(artifacts[name].get(), want)
print("RESULTS " + json.dumps(results), flush=True)
task.upload_artifact("results", results)
'''

PARAMS_STEP = '''\
import json

from controller import Task

task = Task.init("sdk-e2e", "params template")
config = {"lr": 0.1, "epochs": 10, "use_gpu": False, "name": "base", "layers": [1, 2],
          "opts": {"a": 1}, "nothing": None, "ratio": 1.0, "untouched": "default"}
task.connect(config)
task.execute_remotely()
print("TYPED " + json.dumps({k: [type(v).__name__, v] for k, v in config.items()}), flush=True)
'''


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def agent_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CONVEYOR_HOME for every agent of this module (venvs are built once)."""
    return tmp_path_factory.mktemp("sdk-agent-home")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return offline_wheelhouse(["numpy", "pandas", "pillow"], tmp_path_factory.mktemp("sdk-wheels"))


@dataclass
class Stack:
    """A store (embedded or behind a server) and an agent working on it."""

    api_url: str
    backend: Backend
    files_dir: Path | None  # the server's files folder (HTTP only)


@pytest.fixture(params=["sqlite", "http"])
def stack(
    request: pytest.FixtureRequest, tmp_path: Path, agent_home: Path, wheelhouse: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Stack]:
    db_url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    server = None
    files_dir = None
    api_url = db_url
    if request.param == "http":
        files_dir = tmp_path / "server-files"
        server, api_url = start_server(db_url, TOKEN, extra_args=["--files-dir", str(files_dir)])
        monkeypatch.setenv("CONVEYOR_API_TOKEN", TOKEN)
    monkeypatch.setenv("CONVEYOR_API", api_url)
    backend = backend_from_url(api_url)
    env = {
        **os.environ,
        "CONVEYOR_HOME": str(agent_home),
        "CONVEYOR_PIP_ARGS": f"--no-index --find-links {wheelhouse}",
    }
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 - closed below
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "default", "--foreground",
         "--api", api_url, "--stop-grace", "2"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    try:
        yield Stack(api_url, backend, files_dir)
    finally:
        agent.kill()
        agent.wait(10)
        log.close()
        backend.close()
        if server is not None:
            stop_server(server)


def wait_done(stack: Stack, task_id: str, timeout_s: float = 120) -> str:
    """Wait until the task finished; return its log (and fail with it unless completed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        task = stack.backend.get_task(task_id)
        if task.status.is_terminal or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    log = "\n".join(line.line for line in stack.backend.get_log(task_id))
    assert task.status.value == "completed", f"task {task_id} is {task.status.value}:\n{log}"
    return log


def git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True,
        env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
             "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"},
    )


@pytest.fixture
def steps_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "steps"
    repo.mkdir()
    for name, code in (("common.py", COMMON), ("producer.py", PRODUCER), ("consumer.py", CONSUMER)):
        (repo / name).write_text(code)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "steps")
    return repo


# --------------------------------------------------------------------------- tests
def test_every_artifact_type_reaches_the_next_step_equal(stack: Stack, steps_repo: Path, agent_home: Path) -> None:
    producer = Task.create(project_name="sdk-e2e", task_name="producer", repo=str(steps_repo),
                           script="producer.py", packages=DATA_PACKAGES)
    Task.enqueue(producer, queue_name="default")
    assert "uploaded 9 artifacts" in wait_done(stack, producer.id)

    consumer = Task.create(project_name="sdk-e2e", task_name="consumer", repo=str(steps_repo),
                           script="consumer.py", packages=DATA_PACKAGES)
    consumer.set_parameters({"General/producer_id": producer.id})
    Task.enqueue(consumer, queue_name="default")
    log = wait_done(stack, consumer.id)

    results = json.loads(next(line for line in log.splitlines() if line.startswith("RESULTS "))[8:])
    assert results == dict.fromkeys(
        ["file", "folder", "custom", "dict", "dataframe", "array", "image", "text", "point"], True
    )
    assert Task.get_task(task_id=consumer.id).artifacts["results"].get() == results
    # This process (another "machine" over HTTP) reads them too.
    artifacts = Task.get_task(task_id=producer.id).artifacts
    assert artifacts["text"].get() == "hello, conveyor"
    assert artifacts["array"].get().tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    if stack.files_dir is not None:  # over HTTP, everything went through the files endpoint
        assert all(a.url.startswith(f"conveyor://files/sdk-e2e/{producer.id}/") for a in artifacts.values())
        assert all(a.public_url.startswith(f"{stack.api_url}/api/v1/files/") for a in artifacts.values())
        assert (stack.files_dir / "sdk-e2e" / producer.id / "artifacts" / "dataframe").is_dir()
        assert not list(agent_home.glob(f"files/*/{producer.id}"))


def test_overridden_parameters_reach_the_step_with_the_types_of_its_defaults(
    stack: Stack, tmp_path: Path
) -> None:
    script = tmp_path / "params_step.py"
    script.write_text(textwrap.dedent(PARAMS_STEP))
    made = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert "TYPED" not in made.stdout  # execute_remotely() ended the local run

    template = Task.get_task(project_name="sdk-e2e", task_name="params template")
    assert template.get_status() == "created"
    assert template.get_parameter("General/epochs") == 10
    clone = Task.clone(template)
    clone.set_parameters({
        "General/lr": "0.5", "General/epochs": "7", "General/use_gpu": "true", "General/name": 42,
        "General/layers": "[3, 4, 5]", "General/opts": '{"b": 2}', "General/nothing": "None",
        "General/ratio": 2,
    })
    Task.enqueue(clone, queue_name="default")
    log = wait_done(stack, clone.id)

    typed = json.loads(next(line for line in log.splitlines() if line.startswith("TYPED "))[6:])
    assert typed == {
        "lr": ["float", 0.5], "epochs": ["int", 7], "use_gpu": ["bool", True], "name": ["str", "42"],
        "layers": ["list", [3, 4, 5]], "opts": ["dict", {"b": 2}], "nothing": ["NoneType", None],
        "ratio": ["float", 2.0], "untouched": ["str", "default"],
    }
    # The step recorded the values it ran with, typed.
    assert clone.get_parameters()["General/epochs"] == 7
    assert clone.get_parameters()["General/use_gpu"] is True
