"""The systemd unit of the agent daemon is valid and its timeouts fit the daemon's graces."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI

UNIT = Path(__file__).resolve().parents[1] / "scripts" / "systemd" / "conveyor-agent@.service"


def test_systemd_accepts_the_agent_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing (CI=true: .ci/run installs systemd)")
        pytest.skip("systemd-analyze is not installed")
    agent = Path(sys.executable).with_name("agent")
    assert agent.exists(), "the agent console script is not installed"
    rendered = UNIT.read_text().replace("/usr/local/bin/agent", str(agent))
    (tmp_path / "conveyor-agent@.service").write_text(rendered)
    result = subprocess.run(
        ["systemd-analyze", "verify", "conveyor-agent@default.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    ours = [line for line in result.stderr.splitlines() if "conveyor-agent" in line]
    assert result.returncode == 0 and not ours, result.stderr


def test_stop_timeout_covers_the_shutdown_and_stop_graces() -> None:
    text = UNIT.read_text()
    shutdown = float(re.search(r"--shutdown-grace (\d+)", text).group(1))
    stop = float(re.search(r"--stop-grace (\d+)", text).group(1))
    timeout = float(re.search(r"^TimeoutStopSec=(\d+)", text, re.M).group(1))
    assert timeout > shutdown + stop
    assert re.search(r"^KillMode=mixed$", text, re.M), "SIGTERM must reach the daemon only"
    assert re.search(r"^Restart=on-failure$", text, re.M)
    assert re.search(r"^EnvironmentFile=-?/etc/conveyor/agent.env$", text, re.M)
