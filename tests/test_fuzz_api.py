"""A bounded schemathesis run against the OpenAPI document of a real `controller serve`
process, on SQLite and on PostgreSQL: no generated request may get a 5xx answer.

Every operation of /openapi.json gets `EXAMPLES_PER_MODE` cases whose data fits the
schema (positive) and as many that do not (negative: wrong types, missing fields, odd
text such as NUL characters). Generation is derandomized, so a run is reproducible and
takes well under a minute per database (`CONVEYOR_FUZZ_EXAMPLES` sets another number
of cases per operation and mode, for a longer run by hand). Long polls are capped at `MAX_FUZZ_WAIT_S` so a
generated `wait_s` cannot hold the run up. A failure lists every 5xx with a curl command
that reproduces it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.helpers_server import start_server, stop_server

#: Cases per operation and generation mode (positive, negative).
EXAMPLES_PER_MODE = int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "15"))
#: Longest long poll a generated case may ask for (seconds).
MAX_FUZZ_WAIT_S = 0.05
#: Seconds one request may take before the run counts it as hung.
REQUEST_TIMEOUT_S = 30.0

pytestmark = pytest.mark.slow


@dataclass
class FuzzReport:
    """What a fuzz run did: cases sent, and the 5xx answers (with a reproducer each)."""

    cases: int = 0
    server_errors: list[str] = field(default_factory=list)


def _cap_waits(body: object) -> None:
    """Make a generated long poll short: `wait_s` over MAX_FUZZ_WAIT_S is lowered to it."""
    if isinstance(body, dict):
        wait = body.get("wait_s")
        if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > MAX_FUZZ_WAIT_S:
            body["wait_s"] = MAX_FUZZ_WAIT_S


def fuzz_api(base_url: str, examples_per_mode: int) -> FuzzReport:
    """Send `examples_per_mode` positive and negative cases per operation of the
    server's OpenAPI document to `base_url`; report the cases and the 5xx answers."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=10)
    report = FuzzReport()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=examples_per_mode,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(operation.as_strategy(generation_mode=mode))
            def send(case: schemathesis.Case) -> None:
                _cap_waits(case.body)
                response = case.call(base_url=base_url, session=session, timeout=REQUEST_TIMEOUT_S)
                report.cases += 1
                if response.status_code >= 500:
                    report.server_errors.append(
                        f"{response.status_code} {response.text[:300]}\n    "
                        f"{case.as_curl_command()}"
                    )

            try:
                send()
            except Unsatisfiable:
                # No negative case exists for an operation without inputs (GET /queues).
                assert mode is GenerationMode.NEGATIVE, f"no case for {operation.label}"
    session.close()
    return report


def _check(report: FuzzReport, database: str) -> None:
    print(f"\nfuzz {database}: {report.cases} cases, {len(report.server_errors)} 5xx")
    assert report.cases >= EXAMPLES_PER_MODE, "the run sent (almost) no requests"
    shown = "\n".join(report.server_errors[:20])
    assert not report.server_errors, (
        f"{len(report.server_errors)} of {report.cases} requests got a 5xx on {database}:\n{shown}"
    )


@pytest.fixture
def files_args(tmp_path: Path) -> list[str]:
    """The server's files folder in the test's temporary folder."""
    return ["--files-dir", str(tmp_path / "files")]


def _server(db_url: str, files_args: list[str]) -> Iterator[str]:
    proc, base_url = start_server(db_url, extra_args=files_args)
    try:
        yield base_url
    finally:
        output = stop_server(proc)
        if "Traceback" in output:
            print(output[-3000:])


def test_fuzz_sqlite_no_5xx(sqlite_url: str, files_args: list[str]) -> None:
    for base_url in _server(sqlite_url, files_args):
        _check(fuzz_api(base_url, EXAMPLES_PER_MODE), "SQLite")


@pytest.mark.postgres
def test_fuzz_postgres_no_5xx(postgres_url: str, files_args: list[str]) -> None:
    for base_url in _server(postgres_url, files_args):
        _check(fuzz_api(base_url, EXAMPLES_PER_MODE), "PostgreSQL")
