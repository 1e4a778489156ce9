"""Several hosts, one database: two gunicorn masters ("hosts") on different ports share jobs, streams,
the SD pool and the limits through one MongoDB; /metrics merges its counters across workers; logs are
structured JSON with request ids.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from pymongo import MongoClient

from apps.core.jobs import JobManager
from tests.test_faults import story_app_env, until
from tests.test_processes import read_sse

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _need(*paths: str) -> None:
    for rel in paths:
        assert (ROOT / rel).exists(), f"{rel} is missing"


def test_two_hosts_share_jobs_streams_and_one_sd_fleet(
    gunicorn_server: Any, fake_openai: Any, fake_sd_fleet: Any, mongo_client: MongoClient, db_name: str
) -> None:
    _need("apps/storybook/service.py")
    fleet = fake_sd_fleet(2, delay=0.15)
    env = story_app_env(
        fake_openai,
        IMAGE_PROVIDER="sdwebui",
        SD_INSTANCES=",".join(f.url for f in fleet),
        SD_QUEUE_DEPTH=1,  # strictly one-deep, asserted below (depth 2: tests/test_sd_pool.py)
    )
    host_a = gunicorn_server(workers=2, **env)
    host_b = gunicorn_server(workers=2, **env)
    db = mongo_client[db_name]

    # books started through both hosts at once, each streamed through the *other* host
    books: dict[str, str] = {}
    for i, (start, stream) in enumerate([(host_a, host_b), (host_b, host_a)] * 2):
        resp = requests.post(
            f"{start}/storybook/books", json={"description": f"book {i}", "pages": 2}, timeout=15
        )
        assert resp.status_code == 202, resp.text
        books[resp.json()["id"]] = stream
    streamed: dict[str, list[dict[str, Any]]] = {}

    def follow(book: str, host: str) -> None:
        streamed[book] = read_sse(f"{host}/storybook/books/{book}/events", timeout=90)

    readers = [threading.Thread(target=follow, args=item) for item in books.items()]
    for t in readers:
        t.start()
    for t in readers:
        t.join(120)
    assert set(streamed) == set(books)
    for book, events in streamed.items():
        kinds = [e.get("event") for e in events]
        assert kinds[-1] == "done", (book, kinds[-5:])
        assert kinds.count("page.image") == 2
        ids = [int(e["id"]) for e in events if "id" in e]
        assert ids == sorted(set(ids))  # in order, no duplicates across hosts
    # the pool (leases in MongoDB, shared by 4 workers on 2 hosts) never doubled up an instance
    for fake in fleet:
        assert fake.max_running == 1, fake
        assert fake.max_concurrent_seen == 1, f"{fake} got a second image while one was running"
        assert fake.count > 0  # both instances worked
    images = db.generations.count_documents({"kind": "image", "ok": True, "job": {"$in": list(books)}})
    assert images == sum(f.count for f in fleet) == 4 * 3  # 2 pages + a cover per book
    # both hosts answer for every book, whichever ran it
    runners = {db.jobs.find_one({"_id": b})["runner"] for b in books}
    assert len(runners) >= 2
    for book in books:
        for host in (host_a, host_b):
            assert requests.get(f"{host}/jobs/{book}", timeout=10).json()["status"] == "done"


def test_a_job_run_by_a_third_process_streams_through_both_hosts(
    gunicorn_server: Any, fake_openai: Any, mongo_client: MongoClient, db_name: str
) -> None:
    env = story_app_env(fake_openai)
    hosts = [gunicorn_server(workers=2, **env), gunicorn_server(workers=2, **env)]
    jobs = JobManager(mongo_client[db_name], workers=1, lease_s=5)
    jobs.start()
    gate = threading.Event()

    def runner(ctx: Any) -> dict:
        for i in range(6):
            ctx.event("tick", {"i": i})
            gate.wait(0.1)
        return {"n": 6}

    try:
        job_id = jobs.submit(kind="test", app="core", runner=runner)
        got: dict[int, list[dict[str, Any]]] = {}
        readers = [
            threading.Thread(
                target=lambda i=i: got.__setitem__(i, read_sse(f"{hosts[i % 2]}/jobs/{job_id}/events"))
            )
            for i in range(4)
        ]
        for t in readers:
            t.start()
        for t in readers:
            t.join(30)
    finally:
        jobs.shutdown(grace_s=1)
    assert len(got) == 4
    for events in got.values():
        assert [json.loads(e["data"])["data"]["i"] for e in events if e.get("event") == "tick"] == list(
            range(6)
        )
        assert events[-1]["event"] == "done"
    # a reader that reconnects to the other host resumes after its Last-Event-ID
    resumed = read_sse(f"{hosts[1]}/jobs/{job_id}/events", headers={"Last-Event-ID": got[0][3]["id"]})
    assert [e["id"] for e in resumed] == [e["id"] for e in got[0][4:]]


def test_rate_limits_are_shared_by_hosts(gunicorn_server: Any, fake_openai: Any) -> None:
    env = {**story_app_env(fake_openai), "RATE_LIMIT_ENABLED": "true", "RATE_LIMIT_DEFAULT": "8/minute"}
    a, b = gunicorn_server(workers=2, **env), gunicorn_server(workers=1, **env)
    codes = []
    for host in (a, b) * 4:
        codes.append(requests.get(f"{host}/auth/me", timeout=10).status_code)
        time.sleep(0.3)  # > RATE_LIMIT_BATCH_S: each host's hits reach the shared counter
    assert codes == [200] * 8
    over = requests.get(f"{b}/auth/me", timeout=10)
    assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
    assert over.json()["error"]["code"] == "rate_limited"
    assert requests.get(f"{a}/health", timeout=10).status_code == 200  # probes exempt


# ------------------------------------------------------------------ observability


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_are_merged_across_gunicorn_workers(
    gunicorn_server: Any, fake_openai: Any, tmp_path: Path, mongo_client: MongoClient, db_name: str
) -> None:
    metrics_dir = tmp_path / "prom"
    base = gunicorn_server(workers=2, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), **story_app_env(fake_openai))
    n = 0
    # a new connection each time, until both workers have taken some (the kernel decides who accepts,
    # and on a busy machine one worker can take a long run of them)
    while n < 60 or len({p.name for p in metrics_dir.glob("counter_*.db")}) < 2 and n < 2000:
        assert requests.get(f"{base}/ping", timeout=10, headers={"Connection": "close"}).text == "pong"
        n += 1
    assert requests.get(f"{base}/nowhere", timeout=10).status_code == 404
    db = mongo_client[db_name]
    db.jobs.insert_many(
        [
            {"_id": f"metricsjob{i}", "app": "storybook", "status": s}
            for i, s in enumerate(["done", "done", "failed"])
        ]
    )
    writers = {p.name.rsplit("_", 1)[1] for p in metrics_dir.glob("counter_*.db")}
    assert len(writers) == 2, f"both workers should have counted requests: {sorted(writers)}"
    seen = set()
    for _ in range(6):  # whichever worker answers the scrape, the totals are the same
        resp = requests.get(f"{base}/metrics", timeout=10, headers={"Connection": "close"})
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.text
        seen.add(_metric(text, "http_requests_total", method="GET", route="/ping", status="200"))
        assert _metric(text, "http_requests_total", route="<unmatched>", status="404") == 1
        assert _metric(text, "http_request_duration_seconds_count", method="GET", route="/ping") == n
        assert _metric(text, "jobs", app="storybook", status="done") == 2
        assert _metric(text, "jobs", app="storybook", status="failed") == 1
        assert _metric(text, "database_up") == 1
    assert seen == {float(n)}


def test_json_logs_carry_the_request_id(gunicorn_server: Any, fake_openai: Any, tmp_path: Path) -> None:
    base = gunicorn_server(
        workers=1,
        LOG_JSON="true",
        **{**story_app_env(fake_openai), "RATE_LIMIT_ENABLED": "true", "RATE_LIMIT_DEFAULT": "1/minute"},
    )
    assert requests.get(f"{base}/auth/me", timeout=10).status_code == 200
    over = requests.get(f"{base}/auth/me", headers={"X-Request-ID": "req-abc-123"}, timeout=10)
    assert over.status_code == 429 and over.headers["X-Request-ID"] == "req-abc-123"
    generated = requests.get(f"{base}/ping", timeout=10).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{16}", generated)
    log_file = next(tmp_path.glob(f"gunicorn-{base.rsplit(':', 1)[1]}.log"))

    def logged() -> dict[str, Any] | None:
        for line in log_file.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                if row.get("request_id") == "req-abc-123":
                    return row
        return None

    row = until(logged, 10, "a JSON log line with the request id")
    assert {"asctime", "levelname", "name", "message"} <= set(row)
    assert "exceeded" in row["message"]
    # every line the app writes is JSON (gunicorn's own start-up lines are its own format)
    app_lines = [ln for ln in log_file.read_text().splitlines() if "request_id" in ln]
    assert app_lines and all(json.loads(ln) for ln in app_lines)


# ------------------------------------------------------------------ deployment files (no Docker engine here)


def test_compose_file_parses_and_wires_server_to_a_replica_set() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"server", "mongo"} <= set(services)
    mongo, server = services["mongo"], services["server"]
    assert "--replSet" in mongo["command"] and "healthcheck" in mongo
    env = server["environment"]
    assert "replicaSet=" in env["MONGO_URI"] and env["MONGO_URI"].startswith("mongodb://mongo:")
    assert server["depends_on"]["mongo"]["condition"] == "service_healthy"
    # a drain must not be cut short by Docker's own stop timeout
    grace = int(env["GRACEFUL_TIMEOUT"])
    assert int(server["stop_grace_period"].rstrip("s")) > grace
    # every setting the compose file passes is a real Settings field (typos would be ignored silently)
    from config import Settings

    known = set(Settings.model_fields) | {"WEB_CONCURRENCY", "GRACEFUL_TIMEOUT"}
    assert set(env) <= known, set(env) - known


def test_dockerfile_runs_gunicorn_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.splitlines()[1].startswith("#") and "FROM python:3.11-slim" in text
    assert re.search(r"^USER app$", text, re.M)
    # liveness: /health is 503 while an SD instance or the model server is down, which a restart cannot fix
    healthcheck = re.search(r"^HEALTHCHECK .*\n\s+CMD .*", text, re.M)
    assert healthcheck and "/ping" in healthcheck.group(0) and "/health" not in healthcheck.group(0)
    assert 'CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]' in text
    assert "build-essential" in text and "cmake" in text  # llama-cpp-python compiles llama.cpp
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env", "data"} <= set(ignored)
