"""The server's files endpoint: streamed uploads, sha256 checks, limits, paths, auth."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

with warnings.catch_warnings():  # starlette nudges towards httpx2; httpx works the same here
    warnings.filterwarnings("ignore", message="Using `httpx`")
    from fastapi.testclient import TestClient

from controller.server import create_app
from controller.store import SqlBackend

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def files_dir(tmp_path: Path) -> Path:
    return tmp_path / "files"


@pytest.fixture
def client(sqlite_url: str, files_dir: Path) -> Iterator[TestClient]:
    backend = SqlBackend(sqlite_url)
    app = create_app(backend, TOKEN, lease_sweep_s=0, files_dir=files_dir, max_file_bytes=1000,
                     max_body_bytes=100)
    with TestClient(app) as test_client:
        yield test_client
    backend.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_stored_file_comes_back_byte_for_byte(client: TestClient, files_dir: Path) -> None:
    data = bytes(range(256)) * 3  # larger than the API's body limit of this app (100 bytes)
    put = client.put("/api/v1/files/p/t1/artifacts/a/data.bin", content=data,
                     headers={**AUTH, "X-Conveyor-Sha256": sha(data)})
    assert put.status_code == 201, put.text
    assert put.json() == {"path": "p/t1/artifacts/a/data.bin", "size": len(data), "sha256": sha(data)}
    assert (files_dir / "p/t1/artifacts/a/data.bin").read_bytes() == data
    got = client.get("/api/v1/files/p/t1/artifacts/a/data.bin", headers=AUTH)
    assert got.status_code == 200
    assert got.content == data


def test_a_body_that_does_not_match_its_sha256_is_refused_and_not_stored(
    client: TestClient, files_dir: Path
) -> None:
    put = client.put("/api/v1/files/x/data.bin", content=b"what arrived",
                     headers={**AUTH, "X-Conveyor-Sha256": sha(b"what was sent")})
    assert put.status_code == 422
    assert "sha256 mismatch" in put.json()["message"]
    assert not (files_dir / "x" / "data.bin").exists()
    assert list((files_dir / "x").iterdir()) == []  # no temporary file left behind


def test_a_file_over_the_size_limit_is_refused(client: TestClient, files_dir: Path) -> None:
    put = client.put("/api/v1/files/big.bin", content=b"x" * 1001, headers=AUTH)
    assert put.status_code == 413
    assert "too large" in put.json()["message"]
    assert not (files_dir / "big.bin").exists()


def test_a_streamed_body_is_cut_off_at_the_size_limit(client: TestClient, files_dir: Path) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the endpoint counts as it goes
        for _ in range(20):
            yield b"y" * 100

    put = client.put("/api/v1/files/streamed.bin", content=chunks(), headers=AUTH)
    assert put.status_code == 413
    assert not (files_dir / "streamed.bin").exists()


@pytest.mark.parametrize(
    "path",
    ["a/%2E%2E/%2E%2E/escape.txt", "%2E%2E/escape.txt", "a//b.txt", "a/%2E/b.txt", "a%5Cb.txt", "%2Fetc%2Fpasswd"],
)
def test_paths_leaving_the_files_folder_are_refused(client: TestClient, files_dir: Path, path: str) -> None:
    put = client.put(f"/api/v1/files/{path}", content=b"x", headers=AUTH)
    assert put.status_code == 422, put.text
    assert "invalid file path" in put.json()["message"]
    get = client.get(f"/api/v1/files/{path}", headers=AUTH)
    assert get.status_code == 422
    assert not (files_dir.parent / "escape.txt").exists()


def test_files_need_the_api_token(client: TestClient) -> None:
    assert client.put("/api/v1/files/a.txt", content=b"x").status_code == 401
    assert client.put("/api/v1/files/a.txt", content=b"x", headers=AUTH).status_code == 201
    assert client.get("/api/v1/files/a.txt").status_code == 401
    assert client.get("/api/v1/files/a.txt", headers=AUTH).content == b"x"


def test_an_unknown_file_is_404_naming_it(client: TestClient) -> None:
    got = client.get("/api/v1/files/p/nope.bin", headers=AUTH)
    assert got.status_code == 404
    assert "p/nope.bin" in got.json()["message"]
