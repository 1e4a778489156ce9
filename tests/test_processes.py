"""Real processes: gunicorn workers serving SSE for a job that runs elsewhere; a killed runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from pymongo import MongoClient

from apps.core.jobs import JobManager

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def read_sse(url: str, timeout: float = 30.0, headers: dict | None = None) -> list[dict[str, Any]]:
    """Read a whole SSE stream with a real HTTP client; returns events (comments dropped)."""
    events: list[dict[str, Any]] = []
    with requests.get(url, stream=True, timeout=timeout, headers=headers or {}) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for raw in resp.iter_lines(decode_unicode=True):
            if raw is None:
                continue
            if raw == "":
                if current:
                    events.append(current)
                current = {}
            elif raw.startswith(":"):
                continue
            else:
                key, _, value = raw.partition(":")
                value = value[1:] if value.startswith(" ") else value
                current[key] = current.get(key, "") + ("\n" if key in current else "") + value
    return events


def test_sse_from_gunicorn_while_job_runs_in_another_process(
    gunicorn_server: Any, mongo_client: MongoClient, db_name: str, fake_openai: Any
) -> None:
    base = gunicorn_server(workers=2, LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url)
    db = mongo_client[db_name]
    # this test process plays "another host": its JobManager runs the job
    jobs = JobManager(db, workers=1, lease_s=5)
    jobs.start()
    gate = threading.Event()

    def runner(ctx: Any) -> dict:
        for i in range(5):
            ctx.event("tick", {"i": i})
            gate.wait(0.15)
        return {"n": 5}

    job_id = jobs.submit(kind="test", app="core", runner=runner)
    got: list[list[dict[str, Any]]] = []
    readers = [
        threading.Thread(target=lambda: got.append(read_sse(f"{base}/jobs/{job_id}/events")))
        for _ in range(3)
    ]
    for t in readers:
        t.start()
    for t in readers:
        t.join(30)
    jobs.shutdown(grace_s=1)
    assert len(got) == 3
    for events in got:
        ticks = [json.loads(e["data"])["data"]["i"] for e in events if e.get("event") == "tick"]
        assert ticks == [0, 1, 2, 3, 4]
        assert events[-1]["event"] == "done"
        ids = [int(e["id"]) for e in events]
        assert ids == sorted(set(ids))
    snap = requests.get(f"{base}/jobs/{job_id}", timeout=10).json()
    assert snap["status"] == "done" and snap["result"] == {"n": 5}


def test_killed_runner_job_ends_failed(
    mongo_uri: str, mongo_client: MongoClient, db_name: str, tmp_path: Path
) -> None:
    script = tmp_path / "runner.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pymongo import MongoClient
        from apps.core.jobs import JobManager
        db = MongoClient({mongo_uri!r}, tz_aware=True)[{db_name!r}]
        jobs = JobManager(db, workers=1, lease_s=2)
        jobs.start()
        def runner(ctx):
            ctx.event("started", None)
            time.sleep(600)
        job_id = jobs.submit(kind="test", app="core", runner=runner, job_id="killme000001")
        print("READY", flush=True)
        time.sleep(600)
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    db = mongo_client[db_name]
    deadline = time.monotonic() + 10
    while db.jobs.find_one({"_id": "killme000001"})["status"] != "working":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # another live worker's heartbeat thread notices the expired lease
    watcher = JobManager(db, workers=1, lease_s=2)
    watcher.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            doc = db.jobs.find_one({"_id": "killme000001"})
            if doc["status"] != "working":
                break
            assert time.monotonic() < deadline, "job stayed 'working' after its runner died"
            time.sleep(0.1)
        assert doc["status"] == "failed"
        assert doc["error"]["code"] == "runner_died"
        last = db.job_events.find({"job": "killme000001"}).sort("seq", -1).limit(1)[0]
        assert last["type"] == "failed"
    finally:
        watcher.shutdown(grace_s=0)


def test_gunicorn_serves_json_errors(gunicorn_server: Any, fake_openai: Any) -> None:
    base = gunicorn_server(workers=2, LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url)
    assert requests.get(f"{base}/ping", timeout=10).text == "pong"
    resp = requests.get(f"{base}/missing", timeout=10)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    health = requests.get(f"{base}/health", timeout=10).json()
    assert health["database"]["ok"] is True
