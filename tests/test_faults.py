"""Faults injected into real processes: gunicorn, the embedded MongoDB, the fake model servers.

Each test ends by checking the two promises of the fault suite: no job stays `queued` or
`working` (every job ends done / failed / cancelled within its lease), and every request
the server accepted (2xx) left its data in the database.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from pymongo import MongoClient

from apps.core.embedded_mongo import ensure_embedded_mongo, stop_embedded_mongo
from tests.conftest import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
ACTIVE = ["queued", "working"]


# ------------------------------------------------------------------ helpers


def until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll a condition on another process's state (the database, /proc) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(step)


def gunicorn_pids(base: str) -> tuple[int, list[int]]:
    """(master pid, worker pids) of the gunicorn serving `base`, read from /proc."""
    bind = base.removeprefix("http://")
    master = None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gunicorn" in b" ".join(cmd) and bind.encode() in cmd:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parent_cmd = Path(f"/proc/{ppid}/cmdline").read_bytes() if Path(f"/proc/{ppid}").exists() else b""
            if bind.encode() not in parent_cmd:
                master = int(entry.name)
    assert master is not None, f"no gunicorn master for {base}"
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return master, [int(c) for c in children]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = (
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if Path(f"/proc/{pid}").exists()
        else "X"
    )
    return state not in ("Z", "X")


def start_book(base: str, pages: int = 1, **extra: Any) -> str:
    resp = requests.post(
        f"{base}/storybook/books",
        json={"description": "a fox learns to fly", "pages": pages, **extra},
        timeout=15,
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def job_status(db: Any, job_id: str) -> str:
    return db.jobs.find_one({"_id": job_id}, {"status": 1})["status"]


def assert_no_job_left_active(db: Any, timeout: float = 15.0) -> None:
    until(
        lambda: db.jobs.count_documents({"status": {"$in": ACTIVE}}) == 0,
        timeout,
        "every job to reach a terminal state",
    )


def story_app_env(fake_openai: Any, **extra: Any) -> dict[str, Any]:
    try:  # a plan with the asked-for number of pages and distinct page texts
        from tests.test_storybook import story_responder

        fake_openai.set_responder(story_responder(fake_openai))
    except ImportError:  # pragma: no cover - the default reply is schema-valid too
        pass
    return {
        "LLM_PROVIDER": "openai",
        "OPENAI_BASE_URL": fake_openai.url,
        "OPENAI_API_KEY": "k",
        "LLM_MODEL": "fake-model",
        "RATE_LIMIT_ENABLED": "false",
        **extra,
    }


@pytest.fixture
def need_storybook() -> None:
    assert (ROOT / "apps" / "storybook" / "service.py").exists(), "the storybook app runs these faults' jobs"


# ------------------------------------------------------------------ model failures


def test_model_429_and_5xx_are_retried_then_reported(
    gunicorn_server: Any, fake_openai: Any, mongo_client: MongoClient, db_name: str, need_storybook: None
) -> None:
    base = gunicorn_server(workers=1, **story_app_env(fake_openai, LLM_MAX_RETRIES=3))
    db = mongo_client[db_name]
    # two 429s then success: the book is made, and the record shows the extra attempts
    fake_openai.fail_next(429, times=2, endpoint="chat")
    before = len(fake_openai.requests)
    ok = start_book(base)
    until(lambda: job_status(db, ok) in ("done", "failed"), 30, "the retried book")
    assert job_status(db, ok) == "done", db.jobs.find_one({"_id": ok})["error"]
    assert len(fake_openai.requests) - before >= 2 + 2  # two refused + the real plan and page calls
    # 5xx for good: retried LLM_MAX_RETRIES times, then the job ends failed with a clear model error
    fake_openai.fail_next(500, times=50, endpoint="chat")
    bad = start_book(base)
    until(lambda: job_status(db, bad) in ("done", "failed"), 30, "the failing book")
    job = requests.get(f"{base}/jobs/{bad}", timeout=10).json()
    assert job["status"] == "failed" and job["error"]["code"] == "model_error"
    assert job["error"]["message"]
    errors = list(db.generations.find({"job": bad, "ok": False}))
    assert errors and errors[0].get("error")
    book = requests.get(f"{base}/storybook/books/{bad}", timeout=10).json()
    assert book["status"] == "failed"
    assert_no_job_left_active(db)


def test_sd_instance_killed_mid_generation_is_retried_elsewhere(
    gunicorn_server: Any,
    fake_openai: Any,
    fake_sd_fleet: Any,
    mongo_client: MongoClient,
    db_name: str,
    need_storybook: None,
) -> None:
    fleet = fake_sd_fleet(2, delay=0.4)
    base = gunicorn_server(
        workers=2,
        **story_app_env(fake_openai, IMAGE_PROVIDER="sdwebui", SD_INSTANCES=",".join(f.url for f in fleet)),
    )
    db = mongo_client[db_name]
    book = start_book(base, pages=3)
    victim = next(f for f in fleet if f.wait_until_running(timeout=20))
    victim.dead = True  # mid-generation: connections cut, port closed
    until(lambda: job_status(db, book) in ("done", "failed"), 60, "the book after an SD instance died")
    assert job_status(db, book) == "done", db.jobs.find_one({"_id": book})["error"]
    survivor = next(f for f in fleet if f is not victim)
    instances = {g.get("instance") for g in db.generations.find({"job": book, "kind": "image", "ok": True})}
    assert survivor.url in instances
    pages = requests.get(f"{base}/storybook/books/{book}", timeout=10).json()["pages"]
    assert all(p["illustration"] for p in pages)
    for fake in fleet:
        assert fake.max_running <= 1
    assert_no_job_left_active(db)


# ------------------------------------------------------------------ the database goes away


def test_mongodb_restart_fails_cleanly_and_recovers(
    gunicorn_server: Any, fake_openai: Any, tmp_path: Path, need_storybook: None
) -> None:
    data_dir = tmp_path / "own-mongo"
    port = free_port()
    mongo = ensure_embedded_mongo(data_dir, port)
    try:
        base = gunicorn_server(
            workers=2, **story_app_env(fake_openai, MONGO_URI=mongo.uri, MONGO_DB="faults", JOB_LEASE_S="3")
        )
        client: MongoClient = MongoClient(mongo.uri, tz_aware=True, serverSelectionTimeoutMS=3000)
        db = client["faults"]
        accepted = start_book(base)
        until(lambda: job_status(db, accepted) == "done", 30, "the book made before the outage")
        fake_openai.delay = 0.5
        in_flight = start_book(base, pages=2)  # will be running when the database goes
        until(lambda: job_status(db, in_flight) == "working", 10, "the second book to start")

        stop_embedded_mongo(data_dir)
        started = time.monotonic()
        for method, path, body in (
            ("GET", f"/jobs/{accepted}", None),
            ("GET", f"/storybook/books/{accepted}", None),
            ("POST", "/storybook/books", {"description": "during the outage", "pages": 1}),
            ("GET", "/health", None),
        ):
            asked = time.monotonic()
            resp = requests.request(method, base + path, json=body, timeout=30)
            assert time.monotonic() - asked < 5, f"{path}: the 503 must come within 5 s (docs)"
            assert resp.status_code == 503, (path, resp.status_code, resp.text[:300])
            assert resp.headers["Content-Type"].startswith("application/json"), path
            assert "<html" not in resp.text.lower()
            if path != "/health":
                assert resp.json()["error"]["code"] == "database_unavailable"
                assert int(resp.headers["Retry-After"]) > 0
        assert time.monotonic() - started < 60, "outage answers must come within the server selection timeout"

        mongo = ensure_embedded_mongo(data_dir, port)  # same port: the servers' URI stays valid
        fake_openai.delay = 0.0
        # the servers recover by themselves (no restart): reads work and old data is all there
        until(
            lambda: requests.get(f"{base}/jobs/{accepted}", timeout=30).status_code == 200,
            30,
            "the server to answer again",
        )
        snap = requests.get(f"{base}/storybook/books/{accepted}", timeout=10).json()
        assert snap["status"] == "done" and snap["pages"][0]["text"]
        # the job that was running during the outage ends (done, or failed by the reaper) — never stuck
        until(lambda: job_status(db, in_flight) in ("done", "failed"), 30, "the in-flight book to end")
        after = start_book(base)
        until(lambda: job_status(db, after) == "done", 30, "a book after recovery")
        assert (
            db.jobs.count_documents({"input.description": "during the outage"}) == 0
        )  # refused, not half-made
        assert_no_job_left_active(db)
        client.close()
    finally:
        stop_embedded_mongo(data_dir)


# ------------------------------------------------------------------ a worker dies


def test_worker_killed_mid_job_ends_failed_and_can_be_retried(
    gunicorn_server: Any, fake_openai: Any, mongo_client: MongoClient, db_name: str, need_storybook: None
) -> None:
    base = gunicorn_server(workers=2, **story_app_env(fake_openai, JOB_LEASE_S="3"))
    db = mongo_client[db_name]
    fake_openai.delay = 60  # the job sits in a model call when its worker dies
    book = start_book(base)
    doc = until(lambda: db.jobs.find_one({"_id": book, "status": "working"}), 15, "the book to start")
    worker_pid = int(doc["runner"].rsplit(":", 1)[1])
    master, workers = gunicorn_pids(base)
    assert worker_pid in workers
    killed_at = time.monotonic()
    os.kill(worker_pid, signal.SIGKILL)
    fake_openai.delay = 0.0
    # another live worker reaps it within the lease (3 s) plus a heartbeat
    until(lambda: job_status(db, book) != "working", 20, "the dead worker's job to be reaped")
    assert time.monotonic() - killed_at < 15
    job = requests.get(f"{base}/jobs/{book}", timeout=10).json()
    assert job["status"] == "failed" and job["error"]["code"] == "runner_died"
    assert requests.get(f"{base}/storybook/books/{book}", timeout=10).json()["status"] == "failed"
    # the stream of the failed job ends with its terminal event (no hang)
    with requests.get(f"{base}/jobs/{book}/events", stream=True, timeout=15) as resp:
        text = resp.text
    assert "event: failed" in text
    # retry: the same request again succeeds (gunicorn replaced the worker)
    retry = start_book(base)
    until(lambda: job_status(db, retry) == "done", 30, "the retried book")
    _, workers_after = until(
        lambda: (lambda m: m if len(m[1]) == 2 else None)(gunicorn_pids(base)),
        20,
        "gunicorn to replace the worker",
    )
    assert worker_pid not in workers_after
    assert_no_job_left_active(db)


# ------------------------------------------------------------------ shutdown


def test_sigterm_drains_running_jobs_within_the_grace_period(
    gunicorn_server: Any, fake_openai: Any, mongo_client: MongoClient, db_name: str, need_storybook: None
) -> None:
    base = gunicorn_server(workers=1, **story_app_env(fake_openai, GRACEFUL_TIMEOUT="25"))
    db = mongo_client[db_name]
    fake_openai.delay = 0.4  # a book of a few seconds
    book = start_book(base, pages=2)
    until(lambda: job_status(db, book) == "working", 15, "the book to start")
    master, _ = gunicorn_pids(base)
    os.kill(master, signal.SIGTERM)
    until(lambda: not alive(master), 40, "gunicorn to exit")
    doc = db.jobs.find_one({"_id": book})
    assert doc["status"] == "done", doc.get("error")  # it finished during the drain, nothing cut short
    book_doc = db.storybooks.find_one({"_id": book})
    assert book_doc and all(p.get("text") for p in book_doc["pages"])
    assert_no_job_left_active(db, timeout=1)


def test_sigterm_fails_jobs_that_outlast_the_grace_period(
    gunicorn_server: Any, fake_openai: Any, mongo_client: MongoClient, db_name: str, need_storybook: None
) -> None:
    base = gunicorn_server(workers=1, **story_app_env(fake_openai, GRACEFUL_TIMEOUT="7"))
    db = mongo_client[db_name]
    fake_openai.delay = 60
    book = start_book(base)
    until(lambda: job_status(db, book) == "working", 15, "the book to start")
    master, _ = gunicorn_pids(base)
    os.kill(master, signal.SIGTERM)
    until(lambda: not alive(master), 30, "gunicorn to exit")
    fake_openai.delay = 0
    doc = db.jobs.find_one({"_id": book})
    assert doc["status"] == "failed" and doc["error"]["code"] == "shutdown", doc
    last = db.job_events.find({"job": book}).sort("seq", -1).limit(1)[0]
    assert last["type"] == "failed" and json.dumps(last["data"], default=str).count("shutdown")
    assert_no_job_left_active(db, timeout=1)
