"""The embedded database: authentication, durability of research writes, fast failure, supervision.

Real parts only: the embedded secantusdb process, pymongo, and (for supervision) real gunicorn whose
master owns the database.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient, WriteConcern
from pymongo.errors import OperationFailure

from apps.core.db import RESEARCH_COLLECTIONS, DurableDatabase, gridfs_bucket
from apps.core.embedded_mongo import (
    SECRET_FILE,
    STATE_FILE,
    _spawn,
    _wait_answering,
    ensure_embedded_mongo,
    redact_uri,
    stop_embedded_mongo,
    uri_for,
)
from tests.conftest import free_port


@pytest.fixture
def own_db(tmp_path: Path) -> Iterator[Path]:
    """A DATA_DIR of its own (this test kills and restarts its server)."""
    data_dir = tmp_path / "own"
    yield data_dir
    stop_embedded_mongo(data_dir)


def _unauthenticated(port: int) -> MongoClient:
    return MongoClient(uri_for(port), serverSelectionTimeoutMS=3000)


# ------------------------------------------------------------------------------------ authentication


def test_session_database_requires_auth(mongo_data_dir: Path, mongo_uri: str, make_app: Any) -> None:
    """The suite's own server (same code path as production) refuses a client without the secret."""
    port = json.loads((mongo_data_dir / STATE_FILE).read_text())["port"]
    anonymous = _unauthenticated(port)
    try:
        with pytest.raises(OperationFailure) as refused:
            anonymous["study"].command("find", "generations")
        assert refused.value.code == 13  # Unauthorized
        with pytest.raises(OperationFailure):
            anonymous["study"]["generations"].insert_one({"x": 1})
    finally:
        anonymous.close()
    secret = mongo_data_dir / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = secret.read_text().strip()
    assert len(password) >= 32 and password in mongo_uri
    assert password not in redact_uri(mongo_uri) and "***" in redact_uri(mongo_uri)
    # the app's own client authenticates with the URI it was given
    health = make_app().test_client().get("/health").get_json()
    assert health["database"]["ok"], health


def test_existing_unauthenticated_data_dir_gets_a_user(own_db: Path) -> None:
    """A data dir from before authentication: its server is replaced by one with --auth, data kept."""
    own_db.mkdir(parents=True)
    port = free_port()
    old = _spawn(own_db, port, auth=False)
    _wait_answering(old, port, own_db, 30)
    (own_db / STATE_FILE).write_text(json.dumps({"pid": old.pid, "port": port, "owner_pid": os.getpid()}))
    anonymous = _unauthenticated(port)
    anonymous["study"]["storybooks"].insert_one({"_id": "before-auth"})
    anonymous.close()

    server = ensure_embedded_mongo(own_db, port)
    assert old.wait(10) is not None, "the unauthenticated server still runs"
    assert server.owner and server.port == port
    assert stat.S_IMODE((own_db / SECRET_FILE).stat().st_mode) == 0o600
    client: MongoClient = MongoClient(server.uri, serverSelectionTimeoutMS=3000)
    assert client["study"]["storybooks"].find_one({"_id": "before-auth"}) is not None
    client.close()
    anonymous = _unauthenticated(port)
    with pytest.raises(OperationFailure):
        anonymous["study"].command("find", "storybooks")
    anonymous.close()


# ------------------------------------------------------------------------------------ durability


def test_research_collections_cover_every_exported_one() -> None:
    """Every collection exported as research data is written journaled (`jobs` is coordination)."""
    import app  # noqa: F401 - imports every app, which register their export collections
    from apps.core.export import _COLLECTIONS

    missing = set(_COLLECTIONS) - {"jobs"} - RESEARCH_COLLECTIONS
    assert not missing, f"add to RESEARCH_COLLECTIONS in apps/core/db.py: {sorted(missing)}"


def test_write_concerns_are_scoped(mongo_client: MongoClient) -> None:
    db = DurableDatabase(mongo_client, "wc_scope")
    for name in ("generations", "storyteller_feedback", "refinement_saves"):
        assert db[name].write_concern.document.get("j") is True, name
        assert getattr(db, name).write_concern.document.get("j") is True, name
    for name in ("jobs", "job_events", "ratelimit_counters", "llm_slots", "sd_instances", "sd_waiters"):
        assert "j" not in db[name].write_concern.document, name
    bucket = gridfs_bucket(db)
    assert bucket._files.write_concern.document.get("j") is True
    assert bucket._chunks.write_concern.document.get("j") is True
    # w from the URI (a replica set's w: majority) is kept, j added
    majority = DurableDatabase(mongo_client, "wc_scope", write_concern=WriteConcern(w="majority"))
    assert majority.generations.write_concern.document == {"w": "majority", "j": True}


@pytest.mark.timeout(120)
def test_acknowledged_research_writes_survive_kill_9(own_db: Path) -> None:
    """N journaled inserts, kill -9 right after the last ack, restart on the same storage: all N there."""
    n = 300
    server = ensure_embedded_mongo(own_db)
    client: MongoClient = MongoClient(server.uri, serverSelectionTimeoutMS=3000)
    db = DurableDatabase(client, "study")
    db.generations.insert_one({"warm": True})
    db.generations.delete_many({})
    for i in range(n):
        db.generations.insert_one({"i": i, "prompt": "a participant's input " * 10})
    os.kill(server.pid, signal.SIGKILL)  # right after the last acknowledgement
    client.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.waitpid(server.pid, os.WNOHANG)
        except ChildProcessError:
            break
        time.sleep(0.02)

    again = ensure_embedded_mongo(own_db, server.port)
    assert again.pid != server.pid
    client = MongoClient(again.uri, serverSelectionTimeoutMS=3000)
    assert client["study"]["generations"].count_documents({}) == n
    client.close()
