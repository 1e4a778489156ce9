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
import requests
from pymongo import MongoClient, WriteConcern
from pymongo.errors import OperationFailure

from apps.core.db import RESEARCH_COLLECTIONS, DurableDatabase, coordination, gridfs_bucket
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


def test_research_collections_cover_every_exported_one(openai_app: Any) -> None:
    """Every collection exported as research data is written journaled."""
    exported = set(openai_app.extensions["services"].exports.names())
    assert {
        "storybooks",
        "storyteller_sessions",
        "ideation_requests",
        "refinement_sessions",
    } <= exported  # apps added theirs
    missing = exported - RESEARCH_COLLECTIONS
    assert not missing, f"add to RESEARCH_COLLECTIONS in apps/core/db.py: {sorted(missing)}"


def test_write_concerns_are_scoped(mongo_client: MongoClient) -> None:
    db = DurableDatabase(mongo_client, "wc_scope")
    for name in ("jobs", "generations", "storyteller_feedback", "refinement_saves"):
        assert db[name].write_concern.document.get("j") is True, name
        assert getattr(db, name).write_concern.document.get("j") is True, name
    assert "j" not in coordination(db.jobs).write_concern.document  # lease renewals
    for name in ("job_events", "ratelimit_counters", "llm_slots", "sd_instances", "sd_waiters"):
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


# ------------------------------------------------------------------------------------ supervision


def _db_call(base: str, job_id: str) -> tuple[requests.Response, float]:
    started = time.monotonic()
    resp = requests.get(f"{base}/jobs/{job_id}", timeout=60)
    return resp, time.monotonic() - started


@pytest.mark.timeout(180)
def test_master_restarts_killed_database_and_calls_fail_fast(
    gunicorn_server: Any, fake_openai: Any, tmp_path: Path
) -> None:
    """kill -9 the master's embedded database: JSON 503 within 5 s, restarted on the same port, recovery."""
    from tests.test_faults import start_book, story_app_env, until

    data_dir = tmp_path / "master-owned"
    base = gunicorn_server(
        workers=2,
        **story_app_env(
            fake_openai,
            MONGO_URI=None,  # the master starts (and so supervises) the database
            DATA_DIR=str(data_dir),
            MONGO_DB="supervised",
            RATE_LIMIT_ENABLED="true",  # the limiter's own client is on the request path too
            # an outage (2 missed checks + the restart, >= 3.5 s) longer than a call's 2 s server selection
            EMBEDDED_MONGO_CHECK_S="2.5",
            JOB_LEASE_S="10",  # a loaded test machine must not fail the book before the kill
        ),
    )
    until(lambda: requests.get(f"{base}/health", timeout=10).status_code == 200, 60, "the server up")
    job_id = start_book(base)
    until(
        lambda: requests.get(f"{base}/jobs/{job_id}", timeout=10).json()["status"] == "done", 30, "the book"
    )
    before = json.loads((data_dir / STATE_FILE).read_text())

    os.kill(before["pid"], signal.SIGKILL)
    resp, took = _db_call(base, job_id)
    assert resp.status_code == 503, (resp.status_code, f"{took:.2f} s", resp.text[:300])
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json()["error"]["code"] == "database_unavailable"
    assert int(resp.headers["Retry-After"]) > 0
    print(f"first call after the kill: {resp.status_code} in {took:.2f} s")
    assert took < 5.0, f"the 503 took {took:.1f} s"

    def restarted() -> dict | None:
        state = json.loads((data_dir / STATE_FILE).read_text())
        return state if state["pid"] != before["pid"] else None

    after = until(restarted, 15, "the master to restart the database", step=0.1)
    assert after["port"] == before["port"], "restarted on another port: the workers' URI is stale"
    resp = until(
        lambda: (r := _db_call(base, job_id)[0]).status_code == 200 and r, 15, "requests to succeed again"
    )
    assert resp.json()["status"] == "done"  # written before the kill, still there
    assert (
        requests.post(
            f"{base}/storybook/books", json={"description": "after the restart", "pages": 1}, timeout=15
        ).status_code
        == 202
    )

    log = next(tmp_path.glob("gunicorn-*.log")).read_text()
    assert f"embedded MongoDB restarted on 127.0.0.1:{before['port']}" in log, log[-2000:]
    password = (data_dir / SECRET_FILE).read_text().strip()
    assert password not in log and password not in (data_dir / "embedded-mongo.log").read_text()


@pytest.mark.timeout(120)
def test_supervisor_restarts_then_stops_watching(own_db: Path) -> None:
    """Restart on the same port after a kill -9; after stop() (the master's exit) a kill stays a kill."""
    from apps.core.embedded_mongo import Supervisor
    from tests.test_faults import until

    first = ensure_embedded_mongo(own_db)
    supervisor = Supervisor(own_db, first.port, interval_s=0.2).start()
    try:
        os.kill(first.pid, signal.SIGKILL)
        until(lambda: supervisor.restarts == 1 and supervisor.healthy(), 20, "the restart", step=0.1)
        state = json.loads((own_db / STATE_FILE).read_text())
        assert state["pid"] != first.pid and state["port"] == first.port and supervisor.started_one
        client: MongoClient = MongoClient(first.uri, serverSelectionTimeoutMS=3000)  # the old URI works
        client["study"]["x"].count_documents({})  # a command that needs the credentials
        client.close()
    finally:
        supervisor.stop()
    os.kill(state["pid"], signal.SIGKILL)
    time.sleep(1.0)
    assert supervisor.restarts == 1 and not supervisor.healthy(), "restarted after stop()"
