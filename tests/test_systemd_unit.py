"""The systemd unit of the agent daemon: valid, sandboxed, installed where the README says,
and its timeouts fit the daemon's graces."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "scripts" / "systemd" / "conveyor-agent@.service"
#: Where the README's install puts the agent (`python3 -m venv /opt/conveyor`).
INSTALLED_AGENT = "/opt/conveyor/bin/agent"


def _need_systemd_analyze() -> None:
    if shutil.which("systemd-analyze") is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing (CI=true: .ci/run installs systemd)")
        pytest.skip("systemd-analyze is not installed")


def _rendered_unit(folder: Path) -> Path:
    """The unit with ExecStart at this venv's agent (verify checks that the file exists)."""
    agent = Path(sys.executable).with_name("agent")
    assert agent.exists(), "the agent console script is not installed"
    text = UNIT.read_text()
    assert INSTALLED_AGENT in text
    (folder / UNIT.name).write_text(text.replace(INSTALLED_AGENT, str(agent)))
    return folder / UNIT.name


def test_systemd_accepts_the_agent_unit(tmp_path: Path) -> None:
    _need_systemd_analyze()
    _rendered_unit(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "conveyor-agent@default.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    ours = [line for line in result.stderr.splitlines() if "conveyor-agent" in line]
    assert result.returncode == 0 and not ours, result.stderr


def test_systemd_rates_the_sandbox_ok(tmp_path: Path) -> None:
    """`systemd-analyze security`: 9.6 UNSAFE before the sandbox, 2.9 OK with it."""
    _need_systemd_analyze()
    _rendered_unit(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", UNIT.name],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert level, result.stdout + result.stderr
    assert float(level.group(1)) <= 4.0, result.stdout


def test_steps_run_as_a_dedicated_user_in_a_sandbox() -> None:
    text = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert settings["User"] == "conveyor" and settings["Group"] == "conveyor"
    for name, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                        ("PrivateTmp", "yes"), ("ProtectHome", "yes")]:
        assert settings.get(name) == value, name
    home = settings["Environment"].removeprefix("CONVEYOR_HOME=")
    assert home == "/var/lib/conveyor" and home in settings["ReadWritePaths"].split()
    assert settings["StateDirectory"] == "conveyor"  # /var/lib/conveyor, owned by User=
    # docker access is an explicit, documented choice: present but commented out
    assert "SupplementaryGroups" not in settings
    assert re.search(r"^#SupplementaryGroups=docker$", text, re.M)


def test_the_readme_installs_what_the_unit_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) daemon", UNIT.read_text(), re.M).group(1)
    assert exec_start == INSTALLED_AGENT
    assert "python3 -m venv /opt/conveyor" in readme and "/opt/conveyor/bin/pip install" in readme
    assert re.search(r"useradd --system .*conveyor", readme)
    assert "SupplementaryGroups=docker" in readme


def test_stop_timeout_covers_the_shutdown_and_stop_graces() -> None:
    text = UNIT.read_text()
    shutdown = float(re.search(r"--shutdown-grace (\d+)", text).group(1))
    stop = float(re.search(r"--stop-grace (\d+)", text).group(1))
    timeout = float(re.search(r"^TimeoutStopSec=(\d+)", text, re.M).group(1))
    assert timeout > shutdown + stop
    assert re.search(r"^KillMode=mixed$", text, re.M), "SIGTERM must reach the daemon only"
    assert re.search(r"^Restart=on-failure$", text, re.M)
    assert re.search(r"^EnvironmentFile=-?/etc/conveyor/agent.env$", text, re.M)
