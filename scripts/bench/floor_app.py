"""The floor of one HTTP request with the project's stack: a bare FastAPI app on uvicorn
(uvloop, httptools), one sync route with a small pydantic body that answers a constant
JSON, nothing else (no store, no middleware). `scripts/bench/store.py` measures it with
the same `requests` client the HttpBackend uses.

Usage: python scripts/bench/floor_app.py PORT
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.responses import Response

app = FastAPI()


class Body(BaseModel):
    """A body like a status report's."""

    status: str = ""
    worker_id: str | None = None


@app.post("/tasks/{task_id}/status")
def status(task_id: str, body: Body) -> Response:
    """Answer a constant JSON object."""
    return Response(content=b'{"ok":true}', media_type="application/json")


@app.get("/health")
def health() -> Response:
    """Liveness."""
    return Response(content=b'{"ok":true}', media_type="application/json")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
