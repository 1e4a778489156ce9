"""The foundation: factory, errors, validation, CORS, limits, health, docs, images, jobs."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import pytest
from PIL import Image

from apps.core.errors import ApiError
from apps.core.jobs import JobCancelled, JobManager


def png(width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def test_ping_plain_text(client: Any) -> None:
    for method in ("get", "post"):
        resp = getattr(client, method)("/ping")
        assert resp.status_code == 200
        assert resp.data == b"pong"


def test_health_reports_database_model_and_images(client: Any) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["database"]["ok"] is True
    assert body["model"]["provider"] == "openai"
    assert body["images"]["provider"] == "placeholder"
    assert "/storybook" in body["apps"] and "/refinement" in body["apps"]


def test_openapi_and_docs_served_offline(client: Any) -> None:
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    doc = spec.get_json()
    assert doc["openapi"].startswith("3.")
    assert "/health" in doc["paths"] and "/jobs/{job_id}" in doc["paths"]
    docs = client.get("/docs", follow_redirects=True)
    assert docs.status_code == 200
    assert b"swagger" in docs.data.lower()
    # the UI's assets come from the installed package, not a CDN
    assert b"cdn." not in docs.data and b"unpkg" not in docs.data
    html = docs.data.decode()
    import re

    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
    assert assets, "the docs page references no scripts/styles"
    for asset in assets:
        assert not asset.startswith("http"), asset
        got = client.get(asset if asset.startswith("/") else "/docs/" + asset)
        assert got.status_code == 200 and len(got.data) > 1000, asset


@pytest.mark.parametrize("path", ["/nope", "/storybook/nope", "/images/zzz"])
def test_unknown_routes_are_json_404(client: Any, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 404
    assert resp.is_json
    assert resp.get_json()["error"]["status"] == 404


def test_unknown_route_under_envelope_app_uses_envelope(client: Any) -> None:
    resp = client.post("/refinement/nope", json={})
    assert resp.status_code == 404
    body = resp.get_json()
    assert body["success"] is False and body["data"] is None and body["code"] == 1


def test_method_not_allowed_is_json(client: Any) -> None:
    resp = client.delete("/health")
    assert resp.status_code == 405
    assert resp.get_json()["error"]["code"] == "method_not_allowed"
    assert "GET" in resp.headers["Allow"]


def test_oversized_body_is_json_413(make_app: Any, fake_openai: Any) -> None:
    app = make_app(MAX_CONTENT_LENGTH=1024, LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url)
    resp = app.test_client().post("/ping", data=b"x" * 5000, content_type="application/json")
    assert resp.status_code == 413
    assert resp.get_json()["error"]["code"] == "payload_too_large"


def test_cors_preflight_answers_without_auth(client: Any) -> None:
    resp = client.options(
        "/health",
        headers={
            "Origin": "https://picturebook-generator.vercel.app",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert resp.status_code == 200
    # the default CORS_ORIGINS=* allows every origin, never with credentials (issue 15 item 3)
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers
    assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()


def test_cors_origins_are_configurable(make_app: Any, fake_openai: Any) -> None:
    app = make_app(CORS_ORIGINS="https://a.example", LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url)
    c = app.test_client()
    ok = c.get("/health", headers={"Origin": "https://a.example"})
    assert ok.headers.get("Access-Control-Allow-Origin") == "https://a.example"
    other = c.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_images_store_serve_etag_and_404(openai_app: Any) -> None:
    svc = openai_app.extensions["services"]
    data = png()
    image_id = svc.images.save(data, app="storybook", user="u1", prompt="red square")
    c = openai_app.test_client()
    resp = c.get(f"/images/{image_id}.png")
    assert resp.status_code == 200
    assert resp.data == data
    assert resp.mimetype == "image/png"
    etag = resp.headers["ETag"]
    assert "immutable" in resp.headers["Cache-Control"]
    again = c.get(f"/images/{image_id}.png", headers={"If-None-Match": etag})
    assert again.status_code == 304
    missing = c.get("/images/" + "A" * 24 + ".png")
    assert missing.status_code == 404 and missing.is_json


def test_served_images_are_kept_briefly_per_process_and_deletes_apply(openai_app: Any) -> None:
    """A second GET is answered without the database; a delete through the store is seen at once;
    an image removed behind this process's back stops being served after the TTL."""
    from apps.core.storage import ImageStore

    svc = openai_app.extensions["services"]
    c = openai_app.test_client()
    first, second = png(), png(color=(10, 200, 30))
    kept = svc.images.save(first, app="storybook", user="u1")
    assert c.get(f"/images/{kept}.png").data == first
    svc.db["images.chunks"].delete_many({"files_id": kept})  # gone from the database, not from memory
    svc.db["images.files"].delete_one({"_id": kept})
    assert c.get(f"/images/{kept}.png").data == first  # from this process's recent images
    other = svc.images.save(second, app="storybook", user="u1")
    assert c.get(f"/images/{other}.png").status_code == 200
    svc.images.delete(other)
    assert c.get(f"/images/{other}.png").status_code == 404
    short = ImageStore(svc.db, max_bytes=1 << 20, max_side=4096, cache_ttl_s=0.05)
    third = short.save(first, app="storybook")
    assert short.fetch(third) is not None
    svc.db["images.files"].delete_one({"_id": third})
    time.sleep(0.1)
    assert short.fetch(third) is None  # expired from memory, and the database no longer has it
    budget = 10 * len(first)
    tiny = ImageStore(svc.db, max_bytes=1 << 20, max_side=4096, cache_bytes=budget)
    ids = [tiny.save(png(color=(i, i, i)), app="storybook") for i in range(40)]
    for image_id in ids:
        assert tiny.fetch(image_id) is not None
    recent = tiny._recent
    assert recent is not None and 0 < recent._items.currsize <= budget and len(recent._items) < 40


def test_image_store_checks_content_not_names(openai_app: Any) -> None:
    store = openai_app.extensions["services"].images
    with pytest.raises(ApiError) as bad:
        store.save(b"GIF89a not really", app="x")
    assert bad.value.status == 415
    with pytest.raises(ApiError) as empty:
        store.save(b"", app="x")
    assert empty.value.status == 422
    small = type(store)(store.db, max_bytes=100, max_side=4096)
    with pytest.raises(ApiError) as big:
        small.save(png(64, 64, (1, 2, 3)) + b"\0" * 200, app="x")
    assert big.value.status == 413
    narrow = type(store)(store.db, max_bytes=10**6, max_side=16)
    with pytest.raises(ApiError) as wide:
        narrow.save(png(32, 8), app="x")
    assert wide.value.status == 422


# ---------------------------------------------------------------- jobs


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_job_runs_and_reports(openai_app: Any) -> None:
    jobs: JobManager = openai_app.extensions["services"].jobs

    def runner(ctx: Any) -> dict:
        ctx.progress(1, 2)
        ctx.event("note", {"hello": ctx.input["name"]})
        ctx.progress(2, 2)
        return {"ok": True}

    job_id = jobs.submit(kind="test", app="core", runner=runner, input={"name": "x"}, owner="u")
    _wait(lambda: jobs.get(job_id)["status"] == "done")
    _wait(lambda: jobs.events_after(job_id, 0)[-1]["type"] == "done")
    c = openai_app.test_client()
    snap = c.get(f"/jobs/{job_id}").get_json()
    assert snap["status"] == "done" and snap["result"] == {"ok": True}
    assert snap["progress"]["current"] == 2
    types = [e["type"] for e in jobs.events_after(job_id, 0)]
    assert types == ["status", "status", "progress", "note", "progress", "done"]


def test_job_failure_is_recorded(openai_app: Any) -> None:
    jobs = openai_app.extensions["services"].jobs

    def runner(ctx: Any) -> None:
        raise RuntimeError("boom")

    job_id = jobs.submit(kind="test", app="core", runner=runner)
    _wait(lambda: jobs.get(job_id)["status"] == "failed")
    _wait(lambda: jobs.events_after(job_id, 0)[-1]["type"] == "failed")
    doc = jobs.get(job_id)
    assert "boom" in doc["error"]["message"]
    assert jobs.events_after(job_id, 0)[-1]["type"] == "failed"


def test_job_cancel_via_http(openai_app: Any) -> None:
    jobs = openai_app.extensions["services"].jobs
    started = threading.Event()

    def runner(ctx: Any) -> None:
        started.set()
        while True:
            ctx.check_cancelled()
            time.sleep(0.02)

    job_id = jobs.submit(kind="test", app="core", runner=runner)
    assert started.wait(5)
    resp = openai_app.test_client().delete(f"/jobs/{job_id}")
    assert resp.status_code == 200
    _wait(lambda: jobs.get(job_id)["status"] == "cancelled")
    assert JobCancelled is not None


def test_unknown_job_is_404(client: Any) -> None:
    assert client.get("/jobs/doesnotexist123").status_code == 404
    assert client.get("/jobs/bad!id").status_code in (404, 422)


def test_dead_runner_job_marked_failed(openai_app: Any) -> None:
    """A job whose lease expired (its worker died) is reported failed, never 'working' forever."""
    svc = openai_app.extensions["services"]
    from datetime import UTC, datetime, timedelta

    svc.db.jobs.insert_one(
        {
            "_id": "ghostjob0001",
            "kind": "t",
            "app": "core",
            "owner": None,
            "status": "working",
            "seq": 0,
            "runner": "otherhost:1",
            "lease_until": datetime.now(UTC) - timedelta(seconds=1),
            "progress": {},
            "created_at": datetime.now(UTC),
        }
    )
    snap = openai_app.test_client().get("/jobs/ghostjob0001").get_json()
    assert snap["status"] == "failed"
    assert snap["error"]["code"] == "runner_died"


def test_sse_replays_and_resumes(openai_app: Any) -> None:
    jobs = openai_app.extensions["services"].jobs

    def runner(ctx: Any) -> str:
        for i in range(3):
            ctx.event("tick", {"i": i})
        return "fine"

    job_id = jobs.submit(kind="test", app="core", runner=runner)
    _wait(lambda: jobs.get(job_id)["status"] == "done")
    c = openai_app.test_client()
    full = c.get(f"/jobs/{job_id}/events").data.decode()
    ids = [int(line[4:]) for line in full.splitlines() if line.startswith("id: ")]
    assert ids == sorted(ids) and len(ids) == 6
    assert full.startswith(":")
    resumed = c.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[2])}).data.decode()
    rids = [int(line[4:]) for line in resumed.splitlines() if line.startswith("id: ")]
    assert rids == ids[3:]
    assert "event: done" in resumed


def test_metrics_read_the_pool_queue_and_jobs_from_the_database(openai_app: Any) -> None:
    """`sd_waiting_callers` counts waiting images (one queue entry per request, `want` each), not entries."""
    from datetime import UTC, datetime, timedelta

    db = openai_app.extensions["services"].db
    soon = datetime.now(UTC) + timedelta(minutes=1)
    db.sd_waiters.insert_many(
        [
            {"_id": "w1", "ticket": 1, "want": 3, "granted": 0, "expires_at": soon},
            {"_id": "w2", "ticket": 2, "want": 2, "granted": 1, "expires_at": soon},
            {"_id": "w3", "ticket": 3, "want": 0, "granted": 4, "expires_at": soon},  # served: not waiting
            {
                "_id": "w4",
                "ticket": 4,
                "want": 5,
                "granted": 0,
                "expires_at": datetime.now(UTC) - timedelta(seconds=1),
            },
        ]
    )
    db.jobs.insert_one({"_id": "metrics-job", "app": "storybook", "status": "working"})
    text = openai_app.test_client().get("/metrics").get_data(as_text=True)
    assert "\nsd_waiting_callers 5.0\n" in text
    assert 'jobs{app="storybook",status="working"} 1.0' in text
    assert "\ndatabase_up 1.0\n" in text
