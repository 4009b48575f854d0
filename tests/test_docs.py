"""Docs as tests: the code blocks of README.md and docs/*.md do what they say.

Every fenced block whose language is `sh`, `bash` or `python` runs, unless its info
string (the words after the language) says otherwise:

- no tag: the block runs (`bash -e -o pipefail`, or the venv's `python`) in a folder
  that looks like a fresh clone after `make demo` (every top-level entry of the
  repository linked, `.venv` linked to this interpreter's venv), with its own
  `CONVEYOR_HOME`, no `CONVEYOR_API`, and `.venv/bin` first on `PATH`. The blocks of
  one document share that folder, in document order.
- `file=NAME`: the block is a file later blocks use; it is written to NAME, not run.
- `postgres` / `docker`: runs with that pytest marker (skipped without the service,
  failing under CI=true). In a PostgreSQL block the database `conveyor` becomes a fresh
  one, dropped afterwards.
- `systemd`: needs root and systemd as PID 1, so it is only syntax-checked.
- `no-test`: shown only (fragments, the test suite's own `make` targets, a foreground
  daemon); syntax-checked, and each `make TARGET` line must name a real target.

In every block, port 8008 becomes a free port, so runs never collide. Whatever a block
leaves running (a background server, a detached agent) is stopped afterwards.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from agent.daemon import local_agents
from tests.conftest import POSTGRES_URL, _need

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE_LANGUAGES = {"sh", "bash", "python"}
BLOCK_TIMEOUT_S = 240
FENCE = re.compile(r"^```(\S*)(.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a document."""

    document: Path
    line: int
    language: str
    tags: frozenset[str]
    file_name: str | None
    code: str

    @property
    def id(self) -> str:
        """`README.md:84` (the line of the opening fence)."""
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def read_blocks(document: Path) -> list[Block]:
    """The fenced blocks of `document`, in order."""
    blocks, lines = [], document.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        start, body = index + 1, []
        index += 1
        while index < len(lines) and not lines[index].startswith("```"):
            body.append(lines[index])
            index += 1
        words = opening.group(2).split()
        file_name = next((w.split("=", 1)[1] for w in words if w.startswith("file=")), None)
        tags = frozenset(w for w in words if not w.startswith("file="))
        blocks.append(Block(document, start, opening.group(1), tags, file_name, "\n".join(body) + "\n"))
        index += 1
    return blocks


ALL_BLOCKS = [b for doc in DOCUMENTS for b in read_blocks(doc) if b.language in RUNNABLE_LANGUAGES]


def _param(block: Block) -> object:
    marks = [getattr(pytest.mark, tag) for tag in ("postgres", "docker") if tag in block.tags]
    return pytest.param(block, id=block.id, marks=marks)


# ------------------------------------------------------------------ the clone-like folder
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Path]:
    """One clone-like folder per document (made on first use)."""
    return {}


def clone_folder(folders: dict[Path, Path], document: Path, base: Path) -> Path:
    """The folder the blocks of `document` run in, with its `file=` blocks written."""
    if document not in folders:
        folder = base / document.stem
        folder.mkdir()
        for entry in ROOT.iterdir():
            if entry.name not in (".venv", ".git"):
                (folder / entry.name).symlink_to(entry)
        (folder / ".venv").symlink_to(Path(sys.prefix))
        for block in read_blocks(document):
            if block.file_name:
                (folder / block.file_name).write_text(block.code)
        folders[document] = folder
    return folders[document]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CONVEYOR_API", "CONVEYOR_API_TOKEN")}
    env["CONVEYOR_HOME"] = str(folder / "home")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _postgres_database(code: str) -> tuple[str, str]:
    """The block with the database `conveyor` renamed to a fresh one, and that name."""
    if shutil.which("createdb") is None:
        _need("PostgreSQL client tools (createdb) are not installed")
    probe = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], capture_output=True)
    if probe.returncode != 0:
        _need(f"PostgreSQL not reachable at {POSTGRES_URL}")
    name = f"docs_{uuid.uuid4().hex[:10]}"
    code = re.sub(r"(127\.0\.0\.1/|-U postgres )conveyor\b", lambda m: m.group(1) + name, code)
    return code, name


def _stop_leftovers(proc: subprocess.Popen[bytes], home: Path) -> None:
    """Stop what the block left running: its process group and any detached agent."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for agent in local_agents(home) if home.is_dir() else []:
        try:
            process = psutil.Process(agent["pid"])
            process.terminate()
            process.wait(30)
        except psutil.Error:
            pass


# ------------------------------------------------------------------------------ tests
def test_the_readme_starts_with_exactly_the_two_set_up_commands() -> None:
    first = read_blocks(ROOT / "README.md")[0]
    commands = [line.split("#")[0].strip() for line in first.code.splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


@pytest.mark.timeout(BLOCK_TIMEOUT_S + 60)
@pytest.mark.parametrize("block", [_param(b) for b in ALL_BLOCKS])
def test_a_documented_block_runs(
    block: Block, folders: dict[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    if block.language == "python":
        ast.parse(block.code, filename=block.id)
    else:
        check = subprocess.run(["bash", "-n"], input=block.code, text=True, capture_output=True)
        assert check.returncode == 0, f"{block.id}: {check.stderr}"
    if "no-test" in block.tags:
        for line in block.code.splitlines():
            words = shlex.split(line.split("#")[0]) if line.startswith("make ") else []
            if words:
                dry = subprocess.run(["make", "-n", "-C", str(ROOT), *words[1:]],
                                     capture_output=True, text=True)
                assert dry.returncode == 0, f"{block.id}: {line}: {dry.stderr}"
        return
    if block.file_name:
        return  # written into the folder for the blocks that use it
    if "systemd" in block.tags:
        pytest.skip(f"{block.id} needs root and systemd as PID 1 (syntax-checked only)")
    if "docker" in block.tags and shutil.which("docker") is None:
        _need("no docker CLI / engine")

    folder = clone_folder(folders, block.document, tmp_path_factory.mktemp("docs"))
    code = block.code.replace("8008", str(_free_port()))
    database = None
    if "postgres" in block.tags:
        code, database = _postgres_database(code)
    env = _environment(folder)
    if block.language == "python":
        script = folder / f"block_{block.line}.py"
        script.write_text(code)
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", code]
    log = folder / f"block_{block.line}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id} still ran after {BLOCK_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")
    finally:
        _stop_leftovers(proc, folder / "home")
        if database:
            subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", "--force",
                            database], capture_output=True)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"{block.id} exited with {proc.returncode}:\n{text}"
