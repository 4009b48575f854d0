"""libpq options in a PostgreSQL URL reach every connection the store opens."""

from __future__ import annotations

import pytest

from controller.store import SqlBackend

pytestmark = pytest.mark.postgres


def test_url_options_with_spaces_apply_to_the_hot_path_connections(postgres_url: str) -> None:
    # Two -c settings, separated by an encoded space, as libpq documents them.
    url = postgres_url.replace("options=", "options=-csynchronous_commit%3Doff%20")
    store = SqlBackend(url)
    try:
        task = store.create_task({"name": "t"})
        store.enqueue(task.id, "default")  # one-statement path: its own connection
        claimed = store.claim(["default"], "w1", wait_s=0.1)  # waits: LISTEN connection too
        assert claimed is not None and claimed.id == task.id
        with store._direct() as conn:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
    finally:
        store.close()
