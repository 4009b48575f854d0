"""docker_args strings → docker SDK run options (no docker engine needed)."""

from __future__ import annotations

import pytest

from agent.environments.docker_args import (
    DockerArgsError,
    agent_gpu_request,
    parse_docker_args,
    parse_gpus,
    parse_size,
)


def kwargs(text: str, **kw: object) -> dict[str, object]:
    return parse_docker_args(text, **kw).create_kwargs()  # type: ignore[arg-type]


def test_both_option_forms_and_short_forms_are_read() -> None:
    got = kwargs(
        "-e A=1 --env B=two --env=C='x y' -eD=4 -v /data:/data:ro --volume=cache:/cache "
        "--network bridge --ipc=private --shm-size 2g --user 1000:1000 -w /work "
        "--memory=512m --cpus 1.5 --label team=ml -l stage=train"
    )
    assert got == {
        "environment": {"A": "1", "B": "two", "C": "x y", "D": "4"},
        "volumes": ["/data:/data:ro", "cache:/cache"],
        "network_mode": "bridge",
        "ipc_mode": "private",
        "shm_size": 2 * 1024**3,
        "user": "1000:1000",
        "working_dir": "/work",
        "mem_limit": 512 * 1024**2,
        "nano_cpus": 1_500_000_000,
        "labels": {"team": "ml", "stage": "train"},
    }


def test_an_empty_string_means_no_options() -> None:
    assert kwargs("") == {} and kwargs("   ") == {}


def test_env_without_a_value_is_taken_from_the_agent_environment() -> None:
    opts = parse_docker_args("-e HOME_DIR -e MISSING", environ={"HOME_DIR": "/root"})
    assert opts.environment == {"HOME_DIR": "/root"}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("--privileged", "--privileged"),
        ("--pid=host", "--pid=host"),
        ("--pid host", "--pid=host"),
        ("--ipc host", "--ipc=host"),
        ("--network=host", "--network=host"),
        ("--net container:abc", "--net=container:abc"),
        ("--device /dev/fuse", "--device /dev/fuse"),
        ("--cap-add SYS_ADMIN", "--cap-add SYS_ADMIN"),
        ("--security-opt seccomp=unconfined", "--security-opt seccomp=unconfined"),
        ("-v /var/run/docker.sock:/var/run/docker.sock", "-v /var/run/docker.sock"),
        ("-v /run/containerd/containerd.sock:/c.sock", "containerd.sock"),
        ("--volume=/:/host", "--volume /"),
        ("-v /proc/1:/p", "-v /proc/1"),
        ("-v /etc/:/host-etc:ro", "-v /etc/"),
    ],
)
def test_host_access_is_refused_without_allow_privileged(text: str, needle: str) -> None:
    with pytest.raises(DockerArgsError, match="--allow-privileged") as err:
        parse_docker_args(text)
    assert needle in str(err.value)
    assert parse_docker_args(text, allow_privileged=True).host_access


def test_privileged_is_passed_on_when_allowed() -> None:
    got = kwargs("--privileged --cap-add SYS_PTRACE --device /dev/fuse", allow_privileged=True)
    assert got == {"privileged": True, "cap_add": ["SYS_PTRACE"], "devices": ["/dev/fuse"]}


def test_harmless_neighbours_of_host_options_are_allowed() -> None:
    opts = parse_docker_args(
        "-v /dev/shm:/dev/shm -v /data/run:/x --security-opt no-new-privileges "
        "--cap-drop ALL --ipc shareable --privileged=false"
    )
    assert opts.host_access == [] and not opts.privileged


def test_unknown_options_fail_naming_every_one() -> None:
    with pytest.raises(DockerArgsError) as err:
        parse_docker_args("-e A=1 --frobnicate 3 --volumes-from=x --read-only")
    message = str(err.value)
    assert "--frobnicate" in message and "--volumes-from" in message and "--read-only" in message
    assert "supported:" in message and "--shm-size" in message


def test_stray_words_are_refused_with_a_hint() -> None:
    with pytest.raises(DockerArgsError, match="container.image"):
        parse_docker_args("ubuntu:22.04 -e A=1")


def test_a_missing_value_is_named() -> None:
    with pytest.raises(DockerArgsError, match="-e needs a value"):
        parse_docker_args("--label a=b -e")


def test_unbalanced_quotes_are_reported() -> None:
    with pytest.raises(DockerArgsError, match="shell line"):
        parse_docker_args("-e A='unterminated")


def test_docker_run_habits_are_ignored_and_reported() -> None:
    opts = parse_docker_args("--rm -it --init --name mine -e A=1")
    assert opts.ignored == ["--rm", "-it", "--init", "--name mine"]
    assert opts.create_kwargs() == {"environment": {"A": "1"}}


def test_the_agents_labels_cannot_be_overridden() -> None:
    with pytest.raises(DockerArgsError, match="agent's own"):
        parse_docker_args("--label conveyor.worker=other")


@pytest.mark.parametrize(
    "spec, message",
    [("relative/path:/x", "absolute host path"), ("/data", "SOURCE:DESTINATION"),
     ("/data:relative", "must be absolute")],
)
def test_bad_volumes_are_explained(spec: str, message: str) -> None:
    with pytest.raises(DockerArgsError, match=message):
        parse_docker_args(f"-v {spec}")


def test_sizes_and_cpus_are_validated() -> None:
    assert parse_size("1.5gb", "--memory") == int(1.5 * 1024**3)
    assert parse_size("1024", "--memory") == 1024
    with pytest.raises(DockerArgsError, match="not a size"):
        parse_docker_args("--memory lots")
    with pytest.raises(DockerArgsError, match="positive number of CPUs"):
        parse_docker_args("--cpus 0")


def test_ulimits_hosts_tmpfs_and_runtime() -> None:
    opts = parse_docker_args(
        "--ulimit nofile=1024:2048 --add-host db:10.0.0.5 --tmpfs /scratch:size=64m "
        "--runtime nvidia --hostname box --dns 1.1.1.1"
    )
    assert opts.ulimits[0]["Name"] == "nofile" and opts.ulimits[0]["Hard"] == 2048
    assert opts.extra_hosts == {"db": "10.0.0.5"}
    assert opts.tmpfs == {"/scratch": "size=64m"}
    assert (opts.runtime, opts.hostname, opts.dns) == ("nvidia", "box", ["1.1.1.1"])


# ------------------------------------------------------------------------- GPUs
@pytest.mark.parametrize(
    "value, count, ids, caps",
    [
        ("all", -1, [], [["gpu"]]),
        ("2", 2, [], [["gpu"]]),
        ("device=1", 0, ["1"], [["gpu"]]),
        ('"device=0,1"', 0, ["0", "1"], [["gpu"]]),
        ("device=0,1", 0, ["0", "1"], [["gpu"]]),
        ('"device=0,2",capabilities=utility', 0, ["0", "2"], [["utility"]]),
        ("count=all,driver=nvidia", -1, [], [["gpu"]]),
    ],
)
def test_gpus_map_to_a_device_request(value: str, count: int, ids: list[str],
                                      caps: list[list[str]]) -> None:
    request = parse_gpus(value)
    assert request["Count"] == count and request["DeviceIDs"] == ids
    assert request["Capabilities"] == caps


def test_gpus_in_docker_args_become_device_requests() -> None:
    got = kwargs("--gpus all")
    assert got["device_requests"][0]["Count"] == -1  # type: ignore[index]


def test_bad_gpus_are_explained() -> None:
    with pytest.raises(DockerArgsError, match="--gpus"):
        parse_docker_args("--gpus many")


def test_the_agents_gpus_option_sets_devices_and_nvidia_visible_devices() -> None:
    request, env = agent_gpu_request("0,1")
    assert request["DeviceIDs"] == ["0", "1"] and request["Capabilities"] == [["gpu"]]
    assert env == {"NVIDIA_VISIBLE_DEVICES": "0,1"}
    request, env = agent_gpu_request("all")
    assert request["Count"] == -1 and env == {"NVIDIA_VISIBLE_DEVICES": "all"}
