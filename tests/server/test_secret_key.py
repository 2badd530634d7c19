"""Every server of a database must share the key that encrypts its secrets: one with another key refuses to
start instead of failing later at each secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from devyard.client import Client
from support import live_server


# uvicorn ends its thread with SystemExit when the app's start-up fails, which is what this test provokes.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_server_with_another_key_refuses_to_start(database_url: str, tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    first = live_server.settings_for(tmp_path / "a", database_url, secret_key=key)
    with live_server.serve_in_thread(first) as server:
        Client(server.url, server.admin_token).post("/api/v1/secrets", {"spec": {"target": "K", "value": "v"}})
    other = live_server.settings_for(tmp_path / "b", database_url, secret_key=Fernet.generate_key().decode())
    with pytest.raises(RuntimeError), live_server.serve_in_thread(other):
        pass
    same = live_server.settings_for(tmp_path / "c", database_url, secret_key=key)
    with live_server.serve_in_thread(same) as server:
        assert Client(server.url, (tmp_path / "a" / "admin-token").read_text().strip()).get("/api/v1/secrets")
