"""Docker steps end to end: real `agent daemon --docker` processes and a real engine.

The image is `conveyor-test/python:3.11` (override: CONVEYOR_TEST_IMAGE), built without
any registry by `scripts/ci/docker-setup.sh`. Without a reachable engine (or the image)
these tests skip, except under CI=true or REQUIRE_DOCKER=1, where they fail. Every test
uses its own worker id and checks afterwards that no container labelled with it is left.
Tests that need no engine (no --docker, no engine at all) run everywhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.backend import Backend
from controller.connect import backend_from_url
from controller.models import TaskStatus
from tests.conftest import IN_CI
from tests.test_agent_e2e import ROOT, Daemons, log_text, wait_for, wait_for_line
from tests.test_agent_venv import make_wheel

TEST_IMAGE = os.environ.get("CONVEYOR_TEST_IMAGE", "conveyor-test/python:3.11")
REQUIRE_DOCKER = IN_CI or os.environ.get("REQUIRE_DOCKER", "").lower() in ("1", "true", "yes")
LABEL_WORKER = "conveyor.worker"


def _need_docker(reason: str) -> None:
    if REQUIRE_DOCKER:
        pytest.fail(f"{reason} (REQUIRE_DOCKER/CI set: docker tests must not be skipped)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def docker_client() -> Any:
    """A docker SDK client whose engine answers and has the test image."""
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable engine
        _need_docker(f"no docker engine reachable: {' '.join(str(exc).split())[:200]}")
    try:
        client.images.get(TEST_IMAGE)
    except Exception:  # noqa: BLE001
        _need_docker(f"test image {TEST_IMAGE} is missing: run scripts/ci/docker-setup.sh")
    return client


@pytest.fixture(scope="module")
def agent_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CONVEYOR_HOME (container venv cache) for every daemon of this module."""
    return tmp_path_factory.mktemp("docker-agent-home")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("docker-wheels")
    make_wheel(path, "tinypkg", "1.0", "VALUE = 'tiny 1.0'\n")
    return path


@pytest.fixture(params=["sqlite", "http"])
def api_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def backend(sqlite_url: str) -> Iterator[Backend]:
    client = backend_from_url(sqlite_url)
    yield client
    client.close()


@pytest.fixture
def daemons(agent_home: Path, wheelhouse: Path, tmp_path: Path) -> Iterator[Daemons]:
    log_dir = tmp_path / "daemon-logs"
    log_dir.mkdir()
    started = Daemons(agent_home, wheelhouse, log_dir)
    yield started
    started.stop_all()


@pytest.fixture
def worker_id(request: pytest.FixtureRequest) -> Iterator[str]:
    """A worker id of this test; afterwards, no container of it may be left."""
    wid = f"docker-test-{uuid.uuid4().hex[:8]}"
    yield wid
    if "docker_client" in request.fixturenames:
        client = request.getfixturevalue("docker_client")
        deadline = time.monotonic() + 15
        while left := containers_of(client, wid):
            if time.monotonic() > deadline:
                for container in left:
                    container.remove(force=True)  # do not leak into the next test
                raise AssertionError(f"containers left behind: {[c.short_id for c in left]}")
            time.sleep(0.2)


def containers_of(client: Any, worker: str) -> list[Any]:
    return client.containers.list(all=True, sparse=True,
                                  filters={"label": f"{LABEL_WORKER}={worker}"})


def container_task(backend: Backend, code: str, **spec: Any) -> str:
    container = {"image": TEST_IMAGE, **spec.pop("container", {})}
    task = backend.create_task({
        "name": "in-docker", "script": {"code": code, "entry_point": "step.py"},
        "container": container, **spec,
    })
    backend.enqueue(task.id)
    return task.id


STEP_USING_EVERYTHING = """
import os, tinypkg
from controller.connect import get_backend
assert os.path.isdir("/conveyor/run"), "not in a container"
marker = open("/tmp/made-by-setup").read().strip()
print("env:", os.environ["GREETING"], "| setup:", marker, "| package:", tinypkg.VALUE)
print("api:", os.environ["CONVEYOR_API"])
backend = get_backend()
task_id = os.environ["CONVEYOR_TASK_ID"]
backend.edit_task(task_id, {"runtime": {"from_container": marker + "/" + tinypkg.VALUE}}, force=True)
backend.append_log(task_id, [{"line": "appended through the API", "stream": "api"}])
"""


# ------------------------------------------------------------------------ tests
@pytest.mark.docker
def test_a_container_step_gets_docker_args_setup_script_packages_and_the_api(
    docker_client: Any, api_url: str, daemons: Daemons, worker_id: str
) -> None:
    backend = backend_from_url(api_url)
    task_id = container_task(
        backend, STEP_USING_EVERYTHING, packages=["tinypkg==1.0"],
        container={"arguments": "-e GREETING=hello --label team=ml --shm-size 128m",
                   "setup_shell_script": "echo setup says hi\necho ready > /tmp/made-by-setup\n"},
    )
    daemons.start(api_url, "--docker", "--worker-id", worker_id)
    done = wait_for(backend, task_id, "completed", "failed", "stopped", timeout=120)
    log = log_text(backend, task_id)
    assert done.status == TaskStatus.completed, log
    assert "env: hello | setup: ready | package: tiny 1.0" in log
    assert "setup says hi" in log and "appended through the API" in log
    # a loopback API is relayed on the bridge address; the embedded store is served by a
    # `controller serve` child of the agent there: both under the host's name
    assert "api: http://host.docker.internal:" in log
    assert done.runtime.model_extra["from_container"] == "ready/tiny 1.0"
    assert done.runtime.model_extra["container"]["image"] == TEST_IMAGE
    assert containers_of(docker_client, worker_id) == []


@pytest.mark.docker
def test_the_container_venv_is_cached_across_tasks_and_files_reach_the_host(
    docker_client: Any, backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str,
    agent_home: Path,
) -> None:
    code = "import tinypkg\nprint('cached run', tinypkg.VALUE)\n"
    first = container_task(backend, code, packages=["tinypkg==1.0", "# cache test"])
    daemons.start(sqlite_url, "--docker", "--worker-id", worker_id)
    assert wait_for(backend, first, "completed", "failed", timeout=120).status == TaskStatus.completed
    writes_output = code + (
        "import os, urllib.parse\n"
        "folder = urllib.parse.urlsplit(os.environ['CONVEYOR_OUTPUT_URI']).path\n"
        "open(os.path.join(folder, 'from-container.txt'), 'w').write('stored')\n"
    )
    second = container_task(backend, writes_output, packages=["tinypkg==1.0", "# cache test"])
    assert wait_for(backend, second, "completed", "failed", timeout=60).status == TaskStatus.completed
    assert "using cached virtualenv" in log_text(backend, second)
    # on the embedded store, the SDK's files area is the agent's, mounted at its own path
    assert (agent_home / "files" / "from-container.txt").read_text() == "stored"


@pytest.mark.docker
def test_tasks_naming_no_image_run_on_the_host_unless_the_agent_has_a_default_image(
    docker_client: Any, backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str
) -> None:
    code = "import os\nprint('in a container:', os.path.isdir('/conveyor/run'))\n"

    def run_plain_task() -> str:
        task = backend.create_task({"name": "plain", "script": {"code": code, "entry_point": "s.py"}})
        backend.enqueue(task.id)
        done = wait_for(backend, task.id, "completed", "failed", timeout=120)
        assert done.status == TaskStatus.completed, log_text(backend, task.id)
        return log_text(backend, task.id)

    host_agent = daemons.start(sqlite_url, "--docker", "--worker-id", worker_id)
    assert "in a container: False" in run_plain_task()
    host_agent.kill()
    host_agent.wait(10)
    daemons.start(sqlite_url, "--docker", TEST_IMAGE, "--worker-id", worker_id)
    assert "in a container: True" in run_plain_task()


@pytest.mark.docker
def test_time_limit_stops_the_step_gracefully_and_removes_the_container(
    docker_client: Any, backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str
) -> None:
    code = (
        "import signal, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        "def bye(*_):\n    print('step got SIGTERM', flush=True)\n    sys.exit(5)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('step started', flush=True)\ntime.sleep(300)\n"
    )
    task_id = container_task(backend, code, execution={"time_limit_s": 2})
    daemons.start(sqlite_url, "--docker", "--worker-id", worker_id)
    wait_for_line(backend, task_id, "step started", timeout=60)
    started = time.monotonic()
    assert containers_of(docker_client, worker_id), "the step should run in a container"
    stopped = wait_for(backend, task_id, "stopped", "failed", "completed", timeout=30)
    assert time.monotonic() - started <= 2 + 2 + 2  # limit + grace (+ slack)
    assert (stopped.status, stopped.status_reason) == (TaskStatus.stopped, "time_limit")
    assert "step got SIGTERM" in log_text(backend, task_id)
    assert containers_of(docker_client, worker_id) == []


@pytest.mark.docker
def test_output_streams_and_an_abort_stops_the_container(
    docker_client: Any, backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str
) -> None:
    task_id = container_task(backend, "import time\nprint('early line')\ntime.sleep(300)\n")
    daemons.start(sqlite_url, "--docker", "--worker-id", worker_id)
    wait_for_line(backend, task_id, "early line", timeout=60)
    assert backend.get_task(task_id).status == TaskStatus.in_progress
    backend.abort_task(task_id)
    stopped = wait_for(backend, task_id, "stopped", "failed", "completed", timeout=30)
    assert (stopped.status, stopped.status_reason) == (TaskStatus.stopped, "aborted")
    assert containers_of(docker_client, worker_id) == []


@pytest.mark.docker
def test_agent_shutdown_stops_the_container_after_the_grace_and_its_api_server(
    docker_client: Any, backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str
) -> None:
    task_id = container_task(backend, "import time\nprint('busy', flush=True)\ntime.sleep(300)\n")
    daemon = daemons.start(sqlite_url, "--docker", "--worker-id", worker_id,
                           "--shutdown-grace", "1")
    wait_for_line(backend, task_id, "busy", timeout=60)
    servers = api_server_children(daemon.pid)
    assert len(servers) == 1, "the agent serves the store to its containers"
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    wait_gone(servers, 5)  # stopped and reaped with the agent
    stopped = backend.get_task(task_id)
    assert (stopped.status, stopped.status_reason) == (TaskStatus.stopped, "agent_shutdown")
    assert containers_of(docker_client, worker_id) == []


@pytest.mark.docker
def test_the_agents_gpus_become_a_device_request_and_nvidia_visible_devices(
    docker_client: Any, backend: Backend, sqlite_url: str, tmp_path: Path
) -> None:
    from agent.environments.docker import DockerSettings, prepare_container
    from agent.executor import ExecutionSettings

    task = backend.create_task({"name": "gpu", "script": {"code": "print(1)", "entry_point": "s.py"},
                                "container": {"image": TEST_IMAGE, "arguments": "--gpus 1"}})
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    settings = ExecutionSettings(worker_id="gpu-test", api_url=sqlite_url, home=tmp_path / "home",
                                 gpus="0,1", docker=DockerSettings())
    said: list[str] = []
    try:
        spec = prepare_container(task, TEST_IMAGE, checkout, checkout, None,
                                 lambda python: [str(python), "s.py"], settings, said.append)
    finally:
        settings.docker.api.close()  # the API server it started for containers
    [request] = spec.create_kwargs["device_requests"]
    assert request["DeviceIDs"] == ["0", "1"] and request["Capabilities"] == [["gpu"]]
    assert spec.create_kwargs["environment"]["NVIDIA_VISIBLE_DEVICES"] == "0,1"
    assert any("replaces the task's --gpus" in line for line in said)


PROBE_QUEUES = (
    "import sys, urllib.error, urllib.request\n"
    "headers = {'Authorization': 'Bearer ' + sys.argv[2]} if sys.argv[2] else {}\n"
    "req = urllib.request.Request(sys.argv[1] + '/api/v1/queues', headers=headers)\n"
    "try:\n    print(urllib.request.urlopen(req, timeout=10).status)\n"
    "except urllib.error.HTTPError as exc:\n    print(exc.code)\n"
)


def api_server_children(pid: int) -> list[Any]:
    """The `controller.server` processes among the children of process `pid`."""
    import psutil

    return [p for p in psutil.Process(pid).children()
            if "controller.server" in " ".join(p.cmdline())]


def wait_gone(processes: list[Any], seconds: float) -> None:
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=seconds)
    assert not alive, f"still running: {[p.pid for p in alive]}"


@pytest.mark.docker
def test_the_store_is_served_to_containers_by_a_child_api_server_with_its_own_token(
    docker_client: Any, sqlite_url: str
) -> None:
    from agent.container_api import ContainerApi

    api = ContainerApi()
    try:
        endpoint = api.endpoint_for(sqlite_url, None, docker_client)
        assert endpoint.url.startswith("http://host.docker.internal:") and endpoint.token
        assert api.endpoint_for(sqlite_url, None, docker_client) == endpoint  # started once
        port = endpoint.url.rsplit(":", 1)[1]
        [server] = [p for p in api_server_children(os.getpid()) if port in p.cmdline()]

        def probe(token: str) -> str:
            output = docker_client.containers.run(
                TEST_IMAGE, ["python3", "-c", PROBE_QUEUES, endpoint.url, token], remove=True,
                extra_hosts=dict(endpoint.extra_hosts), labels={LABEL_WORKER: "api-server-test"},
            )
            return output.decode().strip()

        assert probe(endpoint.token) == "200"
        assert probe("") == "401"  # only the agent's containers have the token
    finally:
        api.close()
    wait_gone([server], 5)


@pytest.mark.docker
def test_a_container_without_network_fails_naming_the_option(
    docker_client: Any, backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str
) -> None:
    task_id = container_task(backend, "print('should not run')\n",
                             container={"arguments": "--network none"})
    daemons.start(sqlite_url, "--docker", "--worker-id", worker_id)
    failed = wait_for(backend, task_id, "completed", "failed", timeout=60)
    assert (failed.status, failed.status_reason) == (TaskStatus.failed, "setup_failed")
    assert "--network none" in failed.status_message
    assert "should not run" not in log_text(backend, task_id)


@pytest.mark.docker
def test_privileged_docker_args_are_refused_without_allow_privileged(
    docker_client: Any, backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str
) -> None:
    task_id = container_task(backend, "print('should not run')\n",
                             container={"arguments": "--privileged -e A=1"})
    daemons.start(sqlite_url, "--docker", "--worker-id", worker_id)
    failed = wait_for(backend, task_id, "completed", "failed", timeout=60)
    assert (failed.status, failed.status_reason) == (TaskStatus.failed, "setup_failed")
    assert "--privileged" in failed.status_message and "--allow-privileged" in failed.status_message
    assert "should not run" not in log_text(backend, task_id)


@pytest.mark.docker
def test_a_failing_setup_script_fails_the_task_with_its_exit_code(
    docker_client: Any, backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str
) -> None:
    task_id = container_task(backend, "print('should not run')\n", container={
        "setup_shell_script": "echo about to fail\nexit 7\n"})
    daemons.start(sqlite_url, "--docker", "--worker-id", worker_id)
    failed = wait_for(backend, task_id, "completed", "failed", timeout=60)
    assert (failed.status, failed.status_reason) == (TaskStatus.failed, "setup_failed")
    assert "setup script" in failed.status_message and "7" in failed.status_message
    assert failed.runtime.exit_code == 7
    log = log_text(backend, task_id)
    assert "about to fail" in log and "should not run" not in log


@pytest.mark.docker
def test_an_image_that_is_missing_and_cannot_be_pulled_fails_naming_it(
    docker_client: Any, backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str
) -> None:
    task_id = container_task(backend, "print(1)\n",
                             container={"image": "conveyor-test/no-such-image:0.0"})
    daemons.start(sqlite_url, "--docker", "--worker-id", worker_id)
    failed = wait_for(backend, task_id, "completed", "failed", timeout=60)
    assert (failed.status, failed.status_reason) == (TaskStatus.failed, "setup_failed")
    assert "conveyor-test/no-such-image:0.0" in failed.status_message
    assert "could not be pulled" in failed.status_message


@pytest.mark.docker
def test_sigkill_of_the_agent_removes_its_container_and_api_server(
    docker_client: Any, backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str
) -> None:
    task_id = container_task(backend, "import time\nprint('running', flush=True)\ntime.sleep(300)\n")
    daemon = daemons.start(sqlite_url, "--docker", "--worker-id", worker_id)
    wait_for_line(backend, task_id, "running", timeout=60)
    assert containers_of(docker_client, worker_id)
    servers = api_server_children(daemon.pid)
    assert len(servers) == 1, "the agent serves the store to its containers"
    daemon.kill()
    daemon.wait(10)
    deadline = time.monotonic() + 15
    while containers_of(docker_client, worker_id):
        assert time.monotonic() < deadline, "the watchdog did not remove the container"
        time.sleep(0.2)
    wait_gone(servers, 15)  # the watchdog kills the agent's API server too


@pytest.mark.docker
def test_leftover_containers_of_the_worker_are_removed_when_it_starts(
    docker_client: Any, sqlite_url: str, daemons: Daemons, worker_id: str
) -> None:
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    docker_client.containers.create(TEST_IMAGE, ["sleep", "300"], labels={
        LABEL_WORKER: worker_id, "conveyor.agent-pid": str(dead_pid.pid),
        "conveyor.agent-host": os.uname().nodename,
    })
    assert containers_of(docker_client, worker_id)
    daemons.start(sqlite_url, "--docker", "--worker-id", worker_id)
    deadline = time.monotonic() + 20
    while containers_of(docker_client, worker_id):
        assert time.monotonic() < deadline, "the leftover container is still there"
        time.sleep(0.2)


# ------------------------------------------------------ no engine needed for these
def test_a_task_with_an_image_fails_on_an_agent_without_docker(
    backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str
) -> None:
    task_id = container_task(backend, "print('ran on the host')\n")
    daemons.start(sqlite_url, "--worker-id", worker_id)
    failed = wait_for(backend, task_id, "completed", "failed", timeout=60)
    assert (failed.status, failed.status_reason) == (TaskStatus.failed, "setup_failed")
    assert "--docker" in failed.status_message and TEST_IMAGE in failed.status_message
    assert "ran on the host" not in log_text(backend, task_id)


def test_no_reachable_docker_engine_fails_the_task_clearly(
    backend: Backend, sqlite_url: str, agent_home: Path, tmp_path: Path, worker_id: str
) -> None:
    task_id = container_task(backend, "print(1)\n")
    env = {**os.environ, "CONVEYOR_HOME": str(agent_home),
           "DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "default", "--foreground",
         "--api", sqlite_url, "--docker", "--worker-id", worker_id],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )
    try:
        failed = wait_for(backend, task_id, "completed", "failed", timeout=60)
    finally:
        proc.kill()
        proc.wait(10)
    assert (failed.status, failed.status_reason) == (TaskStatus.failed, "setup_failed")
    assert "cannot reach the docker engine" in failed.status_message
    assert "no-engine.sock" in failed.status_message
