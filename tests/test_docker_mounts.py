"""Host paths in docker_args, end to end: a real `agent daemon --docker` and a real engine.

`-v //:/host` (the host's root, spelled so a plain string check misses it) fails the
task with a message naming the option and the path; a folder given to the agent with
`--allow-mount` is mounted, also when written through a symlink and with `..`.
Fixtures come from tests/test_docker_e2e.py (skip without an engine, fail under CI=true).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.backend import Backend
from controller.models import TaskStatus
from tests import test_docker_e2e as docker_e2e
from tests.test_agent_e2e import Daemons, log_text, wait_for
from tests.test_docker_e2e import container_task

# The docker end-to-end tests' fixtures, used here by name.
agent_home = docker_e2e.agent_home
backend = docker_e2e.backend
daemons = docker_e2e.daemons
docker_client = docker_e2e.docker_client
wheelhouse = docker_e2e.wheelhouse
worker_id = docker_e2e.worker_id

READ_THE_HOST = """
import os
print("host root entries:", sorted(os.listdir("/host")))
"""

READ_THE_DATA = """
print("data says:", open("/data/in.txt").read().strip())
print("mount says:", open("/data2/in.txt").read().strip())
"""


@pytest.mark.docker
def test_the_hosts_root_is_refused_and_an_allowed_folder_is_mounted(
    docker_client: Any, backend: Backend, sqlite_url: str, daemons: Daemons, worker_id: str,
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("hello from the host\n")
    (tmp_path / "data-link").symlink_to(data)

    root_task = container_task(backend, READ_THE_HOST, container={"arguments": "-v //:/host"})
    outside_task = container_task(backend, READ_THE_HOST,
                                  container={"arguments": f"-v {data}/..:/host:ro"})
    data_task = container_task(backend, READ_THE_DATA,
                               container={"arguments": f"-v {tmp_path}/data-link/./:/data:ro "
                                          f"--mount type=bind,src={data}/,dst=/data2,readonly"})
    daemons.start(sqlite_url, "--docker", "--worker-id", worker_id, "--allow-mount", str(data))

    refused = wait_for(backend, root_task, "completed", "failed", timeout=120)
    assert (refused.status, refused.status_reason) == (TaskStatus.failed, "setup_failed")
    message = refused.status_message
    assert "-v // (= /)" in message and "--allow-privileged" in message, message
    assert "host root entries" not in log_text(backend, root_task)

    outside = wait_for(backend, outside_task, "completed", "failed", timeout=120)
    assert (outside.status, outside.status_reason) == (TaskStatus.failed, "setup_failed")
    assert f"(= {tmp_path})" in outside.status_message, outside.status_message
    assert f"outside the folders the agent allows to mount ({data})" in outside.status_message
    assert "host root entries" not in log_text(backend, outside_task)

    mounted = wait_for(backend, data_task, "completed", "failed", timeout=300)
    assert mounted.status == TaskStatus.completed, log_text(backend, data_task)
    assert "data says: hello from the host" in log_text(backend, data_task)
    assert "mount says: hello from the host" in log_text(backend, data_task)
