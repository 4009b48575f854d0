"""docker_args strings → docker SDK run options (no docker engine needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.environments.docker_args import (
    DockerArgsError,
    agent_gpu_request,
    host_access_of,
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
        "--memory=512m --cpus 1.5 --label team=ml -l stage=train", allowed_mounts=["/data"]
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
    assert any(host_access_of(parse_docker_args(text, allow_privileged=True)))


def test_privileged_is_passed_on_when_allowed() -> None:
    got = kwargs("--privileged --cap-add SYS_PTRACE --device /dev/fuse", allow_privileged=True)
    assert got == {"privileged": True, "cap_add": ["SYS_PTRACE"], "devices": ["/dev/fuse"]}


def test_harmless_neighbours_of_host_options_are_allowed() -> None:
    opts = parse_docker_args(
        "-v /dev/shm:/dev/shm -v /data/run:/x --security-opt no-new-privileges "
        "--cap-drop ALL --ipc shareable --privileged=false", allowed_mounts=["/dev/shm", "/data"]
    )
    assert opts.host_access == [] and not opts.privileged


def test_unknown_options_fail_naming_every_one() -> None:
    with pytest.raises(DockerArgsError) as err:
        parse_docker_args("-e A=1 --frobnicate 3 --cidfile=x --read-only")
    message = str(err.value)
    assert "--frobnicate" in message and "--cidfile" in message and "--read-only" in message
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


# ------------------------------------------------------------ host path policy
#: Spellings that reach a host path the agent does not allow (no --allow-mount given
#: except /data), each refused naming the option; `needle` is in the message.
REFUSED_HOST_PATHS = [
    # the host's root, however written
    ("-v //:/host", "-v // (= /)"),
    ("-v ///:/host", "-v /// (= /)"),
    ("-v /.:/host", "-v /. (= /)"),
    ("-v /./:/host", "-v /./ (= /)"),
    ("-v /..:/host", "-v /.. (= /)"),
    ("-v /../../:/host:rw", "(= /)"),
    ("-v /data/..:/host", "-v /data/.. (= /)"),
    ("-v /data/../..:/host", "(= /)"),
    ("-v/:/host", "-v /"),
    ("-v=//:/host", "-v // (= /)"),
    ("--volume //:/host", "--volume // (= /)"),
    ("--volume=//:/host", "--volume // (= /)"),
    ("--volume=/tmp/../:/host", "(= /)"),
    ("-v '//':/host", "(= /)"),
    ('-v "/./.":/host', "(= /)"),
    # sensitive files and folders
    ("-v /etc/shadow:/s:ro", "-v /etc/shadow"),
    ("-v /etc//shadow:/s", "(= /etc/shadow)"),
    ("-v /etc/./shadow:/s", "(= /etc/shadow)"),
    ("-v /etc:/e", "-v /etc"),
    ("-v /etc/:/e", "(= /etc)"),
    ("-v /root:/r", "-v /root"),
    ("-v /root/.ssh:/k", "-v /root/.ssh"),
    ("-v /root/.ssh/:/k", "(= /root/.ssh)"),
    ("-v /home:/h", "-v /home"),
    ("-v /var:/v", "-v /var"),
    ("-v /var/lib/docker:/d", "-v /var/lib/docker"),
    ("-v /usr:/u", "-v /usr"),
    ("-v /usr/bin/:/u", "(= /usr/bin)"),
    ("-v /boot:/b", "-v /boot"),
    ("-v /proc/1/root:/p", "-v /proc/1/root"),
    ("-v /sys/kernel:/k", "-v /sys/kernel"),
    ("-v /run/docker.sock:/d.sock", "-v /run/docker.sock"),
    ("-v /var/run//docker.sock:/d.sock", "docker.sock"),
    ("-v /var/run/../run/containerd/containerd.sock:/c", "containerd.sock"),
    ("-v /datax:/x", "-v /datax"),  # a sibling whose name starts like an allowed folder
    ("-v /data/../etc:/x", "-v /data/../etc (= /etc)"),
    ("-v /data/sub/../../root:/x", "(= /root)"),
    # --mount, every key spelling, quoted csv
    ("--mount type=bind,source=/,target=/host", "--mount /"),
    ("--mount type=bind,src=//,dst=/host", "--mount // (= /)"),
    ("--mount=type=bind,src=/etc,destination=/e", "--mount /etc"),
    ("--mount type=bind,target=/h,source=/home/", "--mount /home/ (= /home)"),
    ("--mount TYPE=BIND,SRC=/root,DST=/r", "--mount /root"),
    ("--mount type=bind,src=/root/.ssh,dst=/k,readonly", "--mount /root/.ssh"),
    ("--mount type=bind,src=/root/.ssh,dst=/k,ro=true", "--mount /root/.ssh"),
    ("--mount 'type=bind,\"src=/data/../etc\",dst=/e'", "(= /etc)"),
    ('--mount "type=bind,src=/var,dst=/v,bind-propagation=rslave"', "--mount /var"),
    ("--mount type=bind,src=/data/..,dst=/h", "(= /)"),
    ("--mount type=volume,dst=/h,volume-driver=local,volume-opt=type=none,"
     "volume-opt=device=/,volume-opt=o=bind", "volume-opt"),
    ("--mount type=volume,dst=/h,volume-opt=device=/etc,volume-opt=o=bind", "volume-opt"),
    ("--mount type=volume,src=v,dst=/h,volume-driver=sshfs", "volume-driver"),
    # devices and other containers' volumes
    ("--device /dev/sda", "--device /dev/sda"),
    ("--device=/dev//sda:/dev/xvda:rwm", "--device /dev//sda (= /dev/sda)"),
    ("--device /dev/../dev/mem", "(= /dev/mem)"),
    ("--volumes-from other", "--volumes-from other"),
    ("--volumes-from=other:ro", "--volumes-from other:ro"),
    # several at once: every one is named
    ("-v //:/a --mount type=bind,src=/etc,dst=/b", "-v // (= /)"),
]


@pytest.mark.parametrize("text, needle", REFUSED_HOST_PATHS)
def test_host_paths_are_normalized_and_refused_outside_the_allowed_folders(
    text: str, needle: str
) -> None:
    assert len(REFUSED_HOST_PATHS) >= 50
    with pytest.raises(DockerArgsError, match="--allow-privileged") as err:
        parse_docker_args(text, allowed_mounts=["/data"])
    assert needle in str(err.value), str(err.value)
    # the agent's --allow-privileged lifts every one of them
    parse_docker_args(text, allow_privileged=True)


def test_every_refused_path_is_named_in_one_message() -> None:
    with pytest.raises(DockerArgsError) as err:
        parse_docker_args("-v //:/a --mount type=bind,src=/etc/shadow,dst=/b -v /srv:/c")
    message = str(err.value)
    for needle in ("-v // (= /)", "--mount /etc/shadow", "-v /srv", "--allow-mount"):
        assert needle in message, message


def test_a_symlink_to_the_root_is_resolved(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link-to-root").symlink_to("/")
    (tmp_path / "data" / "link-to-etc").symlink_to("/etc")
    allowed = [str(tmp_path / "data")]
    for link in ("link-to-root", "link-to-etc/", "link-to-root/etc"):
        with pytest.raises(DockerArgsError, match="access to the host"):
            parse_docker_args(f"-v {tmp_path}/data/{link}:/x", allowed_mounts=allowed)
    with pytest.raises(DockerArgsError, match="outside the folders"):
        parse_docker_args(f"-v {tmp_path}/data/link-to-root/home:/x", allowed_mounts=allowed)


def test_paths_under_allowed_folders_are_mounted_normalized(tmp_path: Path) -> None:
    real = tmp_path / "real-data"
    (real / "set").mkdir(parents=True)
    (tmp_path / "data").symlink_to(real)  # the allowed folder itself is a link
    got = kwargs(
        f"-v {tmp_path}//data/./set/:/in:ro -v=cache:/cache "
        f"--mount type=bind,src={tmp_path}/data,dst=/all,readonly "
        "--mount type=volume,src=named,dst=/named,volume-nocopy "
        "--mount type=tmpfs,dst=/scratch,tmpfs-size=64m",
        allowed_mounts=[f"{tmp_path}/data/"],
    )
    assert got["volumes"] == [f"{real}/set:/in:ro", "cache:/cache"]
    mounts = got["mounts"]
    assert mounts[0] == {"Target": "/all", "Source": str(real), "Type": "bind", "ReadOnly": True}
    assert mounts[1]["Type"] == "volume" and mounts[1]["Source"] == "named"
    assert mounts[1]["VolumeOptions"]["NoCopy"] is True
    assert mounts[2]["TmpfsOptions"]["SizeBytes"] == 64 * 1024**2


def test_named_volumes_need_no_allowed_folder() -> None:
    assert kwargs("-v cache:/cache -v pip-cache:/root/.cache:ro") == {
        "volumes": ["cache:/cache", "pip-cache:/root/.cache:ro"]
    }


@pytest.mark.parametrize("option", ["--env-file", "--label-file"])
def test_files_the_docker_cli_reads_on_its_host_are_refused_even_when_privileged(option: str) -> None:
    for text in (f"{option} /etc/shadow", f"{option}=/etc/passwd"):
        with pytest.raises(DockerArgsError, match="-e NAME=VALUE"):
            parse_docker_args(text, allow_privileged=True)


@pytest.mark.parametrize(
    "value, message",
    [("type=bind,dst=/x", "needs source=PATH"), ("type=bind,src=rel,dst=/x", "must be absolute"),
     ("type=bind,src=/data", "absolute target"), ("type=volume,src=/data,dst=/x", "type=bind"),
     ("type=npipe,src=x,dst=/x", "not supported"), ("type=bind,src=/data,dst=/x,bogus=1", "bogus"),
     ("type=tmpfs,src=x,dst=/x", "no source"), ("type=tmpfs,dst=/x,tmpfs-mode=rwx", "octal"),
     ("type=bind,src=/data,dst=/x,ro=maybe", "true or false")],
)
def test_bad_mounts_are_explained(value: str, message: str) -> None:
    with pytest.raises(DockerArgsError, match=message):
        parse_docker_args(f"--mount {value}", allowed_mounts=["/data"])
