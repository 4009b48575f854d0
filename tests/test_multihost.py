"""Pipelines across machines: steps on agents that reach the server by different addresses.

The harness makes a second "machine" with a network namespace and a veth pair whose
addresses are private to the test (10.231.X.0/30, X free on this host); both are torn
down after the test, whatever happened:

- machine A (the namespace, `10.231.X.2`): `controller serve` (listening on the
  namespace's own interfaces only) and agent A on queue "near", reaching the server as
  `http://127.0.0.1:PORT`;
- machine B (this host, `10.231.X.1`): agent B on queue "far" and the pipeline itself
  (this test process), reaching the server as `http://10.231.X.2:PORT`.

Each agent has its own CONVEYOR_HOME. Steps alternate between the machines and pass
artifacts and models both ways, so a record that named the address its writer used
(`http://127.0.0.1:PORT/api/v1/files/...`, what versions before `conveyor://files/`
references stored) would fail on the other machine. The server's `--public-url` is
the veth address: the download link the dashboard shows works from both machines.

Needs root, Linux and `ip` (iproute2): skipped with the reason otherwise, failing under
CI=true. Traffic goes only to loopback and the test's own namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from controller.connect import backend_from_url
from controller.models import TaskStatus
from tests.conftest import _need
from tests.helpers_server import free_port

pytestmark = [pytest.mark.multihost, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "multihost-token"
STARTUP_TIMEOUT_S = 60.0
IP_TIMEOUT_S = 20.0


# ------------------------------------------------------------------- the harness
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; CalledProcessError (with its stderr) when `check` and it fails."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=check)


def _why_no_namespaces() -> str | None:
    """Why this machine cannot make network namespaces, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    return None


def _free_subnet() -> int:
    """An X such that no address of this host is in 10.231.X.0/24."""
    used = _ip("-o", "-4", "addr", "show").stdout
    candidates = [x for x in range(1, 255) if f" 10.231.{x}." not in used]
    if not candidates:
        pytest.fail("no free 10.231.X.0/24 subnet on this host")
    return random.choice(candidates)


@dataclass(frozen=True)
class Link:
    """A network namespace joined to this host by a veth pair."""

    namespace: str
    host_address: str  # this host's end
    namespace_address: str  # the namespace's end

    def command(self, *argv: str) -> list[str]:
        """`argv` run inside the namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@contextlib.contextmanager
def namespace_link() -> Iterator[Link]:
    """A namespace with a veth pair to this host (addresses 10.231.X.1 and .2), removed
    after, even on failure. Skips (fails under CI=true) where namespaces cannot be made."""
    reason = _why_no_namespaces()
    if reason:
        _need(f"multi-host tests: {reason}")
    suffix = uuid.uuid4().hex[:6]
    name, host_dev, ns_dev = f"conveyor-test-{suffix}", f"cvh{suffix}", f"cvn{suffix}"
    subnet = _free_subnet()
    link = Link(name, f"10.231.{subnet}.1", f"10.231.{subnet}.2")
    try:
        try:
            _ip("netns", "add", name)
        except subprocess.CalledProcessError as exc:
            _need(f"multi-host tests: cannot create a network namespace: {exc.stderr.strip()}")
        _ip("link", "add", host_dev, "type", "veth", "peer", "name", ns_dev)
        _ip("link", "set", ns_dev, "netns", name)
        _ip("addr", "add", f"{link.host_address}/30", "dev", host_dev)
        _ip("link", "set", host_dev, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{link.namespace_address}/30", "dev", ns_dev)
        _ip("netns", "exec", name, "ip", "link", "set", ns_dev, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield link
    finally:
        _ip("netns", "del", name, check=False)  # takes the namespace's end of the pair along
        _ip("link", "del", host_dev, check=False)


def _env(home: Path, api: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(CONVEYOR_HOME=str(home), CONVEYOR_API=api, CONVEYOR_API_TOKEN=TOKEN,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Cluster:
    """The two machines: the server's address seen from each, and the agents' homes."""

    link: Link
    near_api: str  # machine A (the namespace): the server as 127.0.0.1
    far_api: str  # machine B (this host): the server by the veth address
    files_dir: Path
    logs: dict[str, Path]

    def logs_text(self) -> str:
        """Every process's output, for failure messages."""
        return "\n".join(f"--- {n}\n{p.read_text(errors='replace')[-4000:]}" for n, p in self.logs.items() if p.exists())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Server and agent A in a namespace, agent B on this host (see the module docstring)."""
    root = tmp_path_factory.mktemp("multihost")
    with namespace_link() as link, contextlib.ExitStack() as stack:
        port = free_port()
        near_api = f"http://127.0.0.1:{port}"
        far_api = f"http://{link.namespace_address}:{port}"
        files_dir = root / "server-files"
        logs = {name: root / f"{name}.log" for name in ("server", "agent-near", "agent-far")}
        cluster = Cluster(link, near_api, far_api, files_dir, logs)
        server_env = _env(root / "server-home", near_api)
        server_env.pop("CONVEYOR_API")
        server = subprocess.Popen(
            link.command(sys.executable, "-m", "controller.cli", "serve", "--host", "0.0.0.0",
                         "--port", str(port), "--db", f"sqlite:///{root / 'conveyor.db'}",
                         "--token", TOKEN, "--files-dir", str(files_dir), "--public-url", far_api),
            env=server_env, stdout=open(logs["server"], "wb"), stderr=subprocess.STDOUT, cwd=ROOT,  # noqa: SIM115
        )
        stack.callback(_stop, server)
        _wait_healthy(far_api, server, cluster)
        agents = {
            "agent-near": link.command(sys.executable, "-m", "agent.cli", "daemon", "--queue", "near",
                                       "--create-queue", "--foreground", "--concurrency", "2",
                                       "--stop-grace", "1"),
            "agent-far": [sys.executable, "-m", "agent.cli", "daemon", "--queue", "far", "--create-queue",
                          "--foreground", "--concurrency", "2", "--stop-grace", "1"],
        }
        for name, argv in agents.items():
            api = near_api if name == "agent-near" else far_api
            proc = subprocess.Popen(argv, env=_env(root / f"{name}-home", api), cwd=ROOT,
                                    stdout=open(logs[name], "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
            stack.callback(_stop, proc)
        _wait_for_queues(far_api, ("near", "far"), cluster)  # made by the agents at start
        yield cluster


def _wait_for_queues(api: str, names: tuple[str, ...], cluster: Cluster) -> None:
    """Wait until the agents created their queues (a pipeline launched before would fail)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    for name in names:
        while True:
            try:
                answer = requests.get(f"{api}/api/v1/queues/{name}",
                                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1)
                if answer.ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"queue {name!r} was not created by its agent:\n{cluster.logs_text()}")
            time.sleep(0.1)


def _wait_healthy(api: str, server: subprocess.Popen, cluster: Cluster) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if server.poll() is not None:
            pytest.fail(f"the server exited with code {server.returncode}:\n{cluster.logs_text()}")
        try:
            if requests.get(f"{api}/api/v1/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not answer at {api}:\n{cluster.logs_text()}")
        time.sleep(0.1)


@pytest.fixture
def far_client(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """This process as a client on machine B (the pipeline runs here)."""
    monkeypatch.setenv("CONVEYOR_API", cluster.far_api)
    monkeypatch.setenv("CONVEYOR_API_TOKEN", TOKEN)
    backend = backend_from_url(cluster.far_api, token=TOKEN)
    yield backend
    backend.close()


def _in_namespace(cluster: Cluster, code: str) -> str:
    """Run Python `code` on machine A (inside the namespace) as a client; its stdout."""
    done = subprocess.run(
        cluster.link.command(sys.executable, "-c", code), env=_env(Path("/nonexistent"), cluster.near_api),
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ------------------------------------------------------------ function steps
def make_data(rows: int = 3):
    from pathlib import Path

    from controller import OutputModel, Task

    weights = Path("near-weights.bin")
    weights.write_bytes(b"near weights " * rows)
    OutputModel(task=Task.current_task(), name="near-model").update_weights(str(weights))
    return {"rows": list(range(rows)), "made_on": "near"}


def transform(data: dict, model_url: str = ""):
    from pathlib import Path

    from controller import OutputModel, StorageManager, Task

    weights = Path(StorageManager.get_local_copy(model_url)).read_bytes()
    Path("far-weights.bin").write_bytes(weights.upper())
    OutputModel(task=Task.current_task(), name="far-model").update_weights("far-weights.bin")
    return {"rows": [r * 10 for r in data["rows"]], "seen_weights": weights.decode().split()[0]}


def summarize(data: dict, model_url: str = ""):
    from pathlib import Path

    from controller import StorageManager

    weights = Path(StorageManager.get_local_copy(model_url)).read_text()
    return {"total": sum(data["rows"]), "seen_weights": data["seen_weights"], "far_weights": weights.split()[0]}


def _assert_alternated(backend: object, cluster: Cluster, step_ids: dict[str, str], near: set[str]) -> None:
    """Each step ran on the machine its queue says; no record names an address."""
    workers = {}
    for step, task_id in step_ids.items():
        record = backend.get_task(task_id)
        assert record.status == TaskStatus.completed, (step, record.status_message, cluster.logs_text())
        workers[step] = record.runtime.worker
        stored = json.dumps([record.model_dump(mode="json")["artifacts"], record.model_dump(mode="json")["models"]])
        assert "127.0.0.1" not in stored and cluster.link.namespace_address not in stored, stored
    near_workers = {workers[s] for s in near}
    far_workers = {workers[s] for s in step_ids if s not in near}
    assert near_workers.isdisjoint(far_workers), workers


def test_a_pipeline_controller_passes_artifacts_and_models_between_hosts(
    cluster: Cluster, far_client: object
) -> None:
    from controller.pipeline import PipelineController

    project = f"multihost-{uuid.uuid4().hex[:6]}"
    pipe = PipelineController(name="across", project=project, version="1.0.0")
    pipe.add_function_step("make", make_data, function_kwargs={"rows": 4}, function_return=["data"],
                           execution_queue="near")
    pipe.add_function_step("transform", transform, execution_queue="far", function_return=["data"],
                           function_kwargs={"data": "${make.data}", "model_url": "${make.models.output.-1.url}"})
    pipe.add_function_step("summarize", summarize, execution_queue="near", function_return=["summary"],
                           function_kwargs={"data": "${transform.data}",
                                            "model_url": "${transform.models.output.-1.url}"})
    pipe.start_locally()
    dag = pipe.get_pipeline_dag()
    assert pipe.is_successful(), ({n: (x.status, x.status_message) for n, x in dag.items()}, cluster.logs_text())
    step_ids = {name: node.executed for name, node in dag.items()}
    _assert_alternated(far_client, cluster, step_ids, near={"make", "summarize"})

    from controller import Task

    summary_artifact = Task.get_task(task_id=step_ids["summarize"]).artifacts["summary"]
    assert summary_artifact.get() == {"total": 60, "seen_weights": "near", "far_weights": "NEAR"}
    assert summary_artifact.url.startswith(f"conveyor://files/{project}/{step_ids['summarize']}/")
    # The reference a step was handed is location-independent:
    transform_task = far_client.get_task(step_ids["transform"])
    handed = transform_task.hyperparams["kwargs"]["model_url"]
    assert handed.startswith(f"conveyor://files/{project}/{step_ids['make']}/models/near-model/")

    # The dashboard's link (public URL) works from both machines, with the token.
    link = summary_artifact.public_url
    assert link.startswith(f"{cluster.far_api}/api/v1/files/{project}/")
    info = requests.get(f"{cluster.far_api}/api/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert info.json()["public_url"] == cluster.far_api
    here = requests.get(link, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert here.status_code == 200 and json.loads(here.content)["total"] == 60
    there = _in_namespace(cluster, (
        "import requests, sys\n"
        f"r = requests.get({link!r}, headers={{'Authorization': 'Bearer {TOKEN}'}}, timeout=10)\n"
        "r.raise_for_status(); sys.stdout.write(r.text)\n"
    ))
    assert json.loads(there)["total"] == 60
    # A client on machine A reads the same records through its own address.
    near_read = _in_namespace(cluster, (
        "from controller import Task\n"
        f"print(Task.get_task(task_id={step_ids['transform']!r}).artifacts['data'].get()['rows'])\n"
    ))
    assert near_read.strip() == "[0, 10, 20, 30]"

    # Files follow tasks: deleting the pipeline deletes its steps and their files.
    (controller_task,) = far_client.query_tasks(project=project, type="controller")
    assert all((cluster.files_dir / project / task_id).is_dir() for task_id in step_ids.values())
    deleted = subprocess.run(
        [sys.executable, "-m", "controller.cli", "tasks", "delete", controller_task.id],
        env=_env(Path("/nonexistent"), cluster.far_api), capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert deleted.returncode == 0, deleted.stderr
    assert f"Deleted task {controller_task.id} and its 3 step(s)." in deleted.stdout
    assert not any((cluster.files_dir / project / task_id).exists() for task_id in step_ids.values())
    assert far_client.query_tasks(project=project) == []


# ----------------------------------------------------------- decorator pipeline
def _components():  # noqa: ANN202 - the decorated components, made once the module is imported
    from controller.automation.controller import PipelineDecorator

    @PipelineDecorator.component(return_values=["data", "model_url"], execution_queue="near", packages=[])
    def deco_make(rows: int = 3):
        from pathlib import Path

        from controller import OutputModel, Task

        Path("w.bin").write_bytes(b"deco-near")
        url = OutputModel(task=Task.current_task(), name="deco-near").update_weights("w.bin")
        return list(range(rows)), url

    @PipelineDecorator.component(return_values=["data", "model_url"], execution_queue="far", packages=[])
    def deco_transform(data, model_url):
        from pathlib import Path

        from controller import OutputModel, StorageManager, Task

        weights = Path(StorageManager.get_local_copy(model_url)).read_bytes()
        Path("w.bin").write_bytes(weights + b"+deco-far")
        url = OutputModel(task=Task.current_task(), name="deco-far").update_weights("w.bin")
        return [r + 100 for r in data], url

    @PipelineDecorator.component(return_values=["result"], execution_queue="near", packages=[])
    def deco_finish(data, model_url):
        from pathlib import Path

        from controller import StorageManager

        return f"{sum(data)}:{Path(StorageManager.get_local_copy(model_url)).read_text()}"

    def across(rows: int = 3):
        data, model_url = deco_make(rows)
        data2, model_url2 = deco_transform(data, model_url)
        return deco_finish(data2, model_url2)

    return across


def test_a_decorator_pipeline_alternates_hosts(cluster: Cluster, far_client: object) -> None:
    from controller.automation.controller import PipelineDecorator

    project = f"multihost-deco-{uuid.uuid4().hex[:6]}"
    pipeline = PipelineDecorator.pipeline(
        name="across-deco", project=project, version="1.0.0", pipeline_execution_queue=None,
        default_queue="near", return_value="result",
    )(_components())
    try:
        result = pipeline(rows=3)
    except Exception as exc:
        raise AssertionError(cluster.logs_text()) from exc
    assert result == "303:deco-near+deco-far"
    (controller,) = far_client.query_tasks(project=project, type="controller")
    assert controller.status == TaskStatus.completed, controller.status_message
    nodes = controller.runtime.pipeline["nodes"]
    step_ids = {name: node["task_id"] for name, node in nodes.items()}
    _assert_alternated(far_client, cluster, step_ids, near={"deco_make", "deco_finish"})


# ----------------------------------------------------------------- a docker agent
@pytest.mark.docker
def test_a_docker_step_between_hosts_reads_and_writes_by_reference(
    cluster: Cluster, far_client: object, tmp_path: Path
) -> None:
    """A third address: the container of a docker agent on machine B reaches the server
    as its agent hands it over; the artifacts and models it passes on still resolve."""
    from tests.test_docker_e2e import TEST_IMAGE, _need_docker

    try:
        import docker

        engine = docker.from_env(timeout=30)
        engine.ping()
        engine.images.get(TEST_IMAGE)
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable engine or image
        _need_docker(f"no docker engine with {TEST_IMAGE}: {' '.join(str(exc).split())[:200]}")
    from controller.pipeline import PipelineController

    worker = f"multihost-docker-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "agent-docker.log"
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "docker", "--create-queue", "--foreground",
         "--docker", "--worker-id", worker, "--stop-grace", "2"],
        env=_env(tmp_path / "docker-home", cluster.far_api), cwd=ROOT,
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    cluster.logs["agent-docker"] = log
    try:
        _wait_for_queues(cluster.far_api, ("docker",), cluster)
        project = f"multihost-docker-{uuid.uuid4().hex[:6]}"
        pipe = PipelineController(name="across-docker", project=project, version="1.0.0")
        pipe.add_function_step("make", make_data, function_kwargs={"rows": 2}, function_return=["data"],
                               execution_queue="near")
        pipe.add_function_step("transform", transform, execution_queue="docker", function_return=["data"],
                               docker=TEST_IMAGE,
                               function_kwargs={"data": "${make.data}", "model_url": "${make.models.output.-1.url}"})
        pipe.add_function_step("summarize", summarize, execution_queue="near", function_return=["summary"],
                               function_kwargs={"data": "${transform.data}",
                                                "model_url": "${transform.models.output.-1.url}"})
        pipe.start_locally()
        dag = pipe.get_pipeline_dag()
        assert pipe.is_successful(), ({n: (x.status, x.status_message) for n, x in dag.items()}, cluster.logs_text())
        step_ids = {name: node.executed for name, node in dag.items()}
        _assert_alternated(far_client, cluster, step_ids, near={"make", "summarize"})
        assert far_client.get_task(step_ids["transform"]).runtime.worker == worker
        from controller import Task

        summary = Task.get_task(task_id=step_ids["summarize"]).artifacts["summary"].get()
        assert summary == {"total": 10, "seen_weights": "near", "far_weights": "NEAR"}
    finally:
        _stop(agent)
        cluster.logs.pop("agent-docker", None)
