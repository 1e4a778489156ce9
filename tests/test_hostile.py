"""Issue 15: isolation, existence oracles, hostile input and dead workers.

Each test names the hole it closes. Apps run against the fake model servers and the embedded
MongoDB; the gunicorn tests run a real gunicorn (its own protocol errors, a killed worker).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import socket
import statistics
import struct
import threading
import time
import zlib
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import pytest
import requests
from bson import json_util
from PIL import Image

from apps.core.auth import create_user
from tests.test_security import SECRET, key_headers, quick_job, secured, wait_done  # noqa: F401 - fixture

SKETCH = "草图的辅助生成"
VOLATILE = ("ratelimit", "sd_", "llm_slots", "server_secrets", "system.")


def png(color: str = "red", size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@cache
def png_bomb(side: int = 20_000) -> bytes:
    """A real, valid 1-bit PNG of side x side pixels (all black): ~48 KB that decode to 400 Mpixel."""
    row = b"\0" + b"\0" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def ideation_body(**over: Any) -> dict[str, Any]:
    base = {
        "username": "10",
        "designTask": "a drone for hill orchards " + secrets.token_hex(4),
        "currentNum": 1,
        "currentAIStage": SKETCH,
        "currentStage": "草图的环境",
        "selectedTexts": [],
        "selectedCanvasRecords": [],
        "selectedButtonInfo": {"buttonText": "转换为草图", "aiStage": SKETCH},
    }
    base.update(over)
    return base


def counts(db: Any) -> dict[str, int]:
    """Documents per collection, without the ones every request may touch (rate-limit counters...)."""
    found = {
        name: db[name].count_documents({})
        for name in sorted(db.list_collection_names())
        if not name.startswith(VOLATILE)
    }
    return {name: n for name, n in found.items() if n}  # an empty collection is no write


def upload(c: Any, data: bytes, headers: dict[str, str] | None = None) -> str:
    resp = c.post(
        "/ideation/upload",
        data={"file": (io.BytesIO(data), "a.png", "image/png")},
        content_type="multipart/form-data",
        headers=headers or {},
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["url"]


# ------------------------------------------------------------------ 1. image references are owner-checked


def test_another_users_image_as_canvas_is_a_404_like_a_missing_one_and_stores_nothing(
    secured: dict[str, Any],  # noqa: F811
) -> None:
    c, h, db = secured["client"], secured["h"], secured["svc"].db
    url = upload(c, png("blue"), h["alice"])
    image_id = url.rsplit("/", 1)[1].removesuffix(".png")
    missing = c.post(
        "/ideation/generate",
        json=ideation_body(selectedCanvasRecords=["/images/" + "A" * 24 + ".png"]),
        headers=h["bob"],
    )
    assert missing.status_code == 404
    before = counts(db)
    for ref in (
        url,
        f"/images/{image_id}.png",
        image_id,
        f"https://elsewhere.example/images/{image_id}.png?x=1",
    ):
        resp = c.post("/ideation/generate", json=ideation_body(selectedCanvasRecords=[ref]), headers=h["bob"])
        assert resp.status_code == 404, (ref, resp.get_json())
        assert resp.get_json() == missing.get_json(), "a foreign image must look exactly like a missing one"
    assert counts(db) == before, "a refused canvas reference stored something"
    # the owner (and an admin) may use it
    for who in ("alice", "admin"):
        ok = c.post("/ideation/generate", json=ideation_body(selectedCanvasRecords=[url]), headers=h[who])
        assert ok.status_code == 200, ok.get_json()


def test_image_reference_resolver_parses_every_form() -> None:
    from apps.core.image_refs import image_id_of

    i = "abcdefghijklmnopqrstuvwx"
    assert image_id_of(f"http://h:5000/images/{i}.png") == i
    assert image_id_of(f"/images/{i}.png?v=2") == i
    assert image_id_of(i) == i
    assert image_id_of("data:image/png;base64,AAAA") is None
    assert image_id_of(f"/images/{i}.png.evil") is None


# ------------------------------------------------------------------ 2. a stream token opens only its job


def test_stream_token_opens_only_its_jobs_stream_and_status(secured: dict[str, Any]) -> None:  # noqa: F811
    c, h, svc = secured["client"], secured["h"], secured["svc"]
    job = quick_job(svc, "bob")
    wait_done(svc, job)
    image = upload(c, png("green"), h["bob"]).split("/images/", 1)[1]
    token = c.post("/auth/stream-token", json={"job_id": job}, headers=h["bob"]).get_json()["token"]
    # the job's own status and stream
    assert c.get(f"/jobs/{job}?token={token}").status_code == 200
    with c.get(f"/jobs/{job}/events?token={token}") as resp:
        assert resp.status_code == 200 and "event: done" in resp.get_data(as_text=True)
    # any other GET, even one that names the job in its query, is refused
    for url in (
        f"/ideation/users/bob/history?token={token}&x={job}",
        f"/images/{image}?token={token}&job={job}",
        f"/refinement/users/bob/sessions?token={token}&id={job}",
        f"/auth/me?token={token}&j={job}",
        f"/storyteller/api/versions?token={token}&session={job}",
    ):
        resp = c.get(url)
        assert resp.status_code == 401, (url, resp.status_code)
        assert resp.is_json


# ------------------------------------------------------------------ 4. existence oracles


def _same_404(a: Any, b: Any, a_id: str, b_id: str) -> None:
    assert a.status_code == b.status_code == 404
    assert a.get_data(as_text=True).replace(a_id, "<id>") == b.get_data(as_text=True).replace(b_id, "<id>")


def test_not_yours_and_missing_answer_the_same_404(secured: dict[str, Any]) -> None:  # noqa: F811
    c, h, svc = secured["client"], secured["h"], secured["svc"]
    nobody = secrets.token_urlsafe(18)
    job = quick_job(svc, "alice")
    wait_done(svc, job)
    _same_404(
        c.get(f"/jobs/{job}", headers=h["bob"]), c.get(f"/jobs/{nobody}", headers=h["bob"]), job, nobody
    )
    token = c.post("/auth/stream-token", json={"job_id": job}, headers=h["bob"])
    _same_404(token, c.post("/auth/stream-token", json={"job_id": nobody}, headers=h["bob"]), job, nobody)
    image = upload(c, png(), h["alice"]).split("/images/", 1)[1].removesuffix(".png")
    _same_404(
        c.get(f"/images/{image}.png", headers=h["bob"]),
        c.get(f"/images/{nobody}.png", headers=h["bob"]),
        image,
        nobody,
    )
    # storyteller: a session and a version of alice's
    session = secrets.token_urlsafe(16)
    made = c.post(
        "/storyteller/api/edit", json={"session": session, "text": "Once upon a time."}, headers=h["alice"]
    )
    assert made.status_code == 404  # a client-named id that does not exist is not created by an edit
    settings = {
        "maincharacter": "a fox",
        "keywords": "moon",
        "genre": "Adventure",
        "registro": "Casual",
        "childsafe": True,
        "maxnowords": 100,
        "twist": False,
        "session": session,
    }
    assert c.post("/storyteller/api/settings", json=settings, headers=h["alice"]).status_code == 200
    version = c.post(
        "/storyteller/api/edit", json={"session": session, "text": "Once upon a time."}, headers=h["alice"]
    ).get_json()["id"]
    _same_404(
        c.get(f"/storyteller/api/session?session={session}", headers=h["bob"]),
        c.get(f"/storyteller/api/session?session={nobody}", headers=h["bob"]),
        session,
        nobody,
    )
    _same_404(
        c.get(f"/storyteller/api/versions/{version}", headers=h["bob"]),
        c.get(f"/storyteller/api/versions/{nobody}", headers=h["bob"]),
        version,
        nobody,
    )
    assert svc.db.storyteller_sessions.count_documents({"_id": nobody}) == 0


def test_basic_auth_spends_the_same_time_on_unknown_users_and_wrong_passwords(make_app: Any) -> None:
    app = make_app(AUTH_MODE="basic", RATE_LIMIT_ENABLED=False)
    create_user(app.extensions["services"].db, "carol", password="right-password")
    c = app.test_client()

    def median_ms(user: str, password: str) -> float:
        import base64

        auth = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert c.get("/auth/me", headers=auth).status_code == 401
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    unknown = median_ms("nobody-" + secrets.token_hex(4), "whatever")
    wrong = median_ms("carol", "wrong-password")
    ratio = max(unknown, wrong) / min(unknown, wrong)
    assert ratio < 3, f"unknown user {unknown:.1f} ms vs wrong password {wrong:.1f} ms"


# ------------------------------------------------------------------ 6. flask users


def test_flask_users_create_list_rotate_revoke(make_app: Any) -> None:
    app = make_app(AUTH_MODE="apikey", RATE_LIMIT_ENABLED=False)
    runner, c = app.test_cli_runner(), app.test_client()

    def key_of(output: str) -> str:
        return output.strip().rsplit(" ", 1)[1]

    def me(key: str) -> int:
        return c.get("/auth/me", headers=key_headers(key)).status_code

    first = runner.invoke(args=["users", "create", "dave"])
    assert first.exit_code == 0, first.output
    key1 = key_of(first.output)
    assert me(key1) == 200
    again = runner.invoke(args=["users", "create", "dave"])
    assert again.exit_code != 0 and "already exists" in again.output
    assert app.extensions["services"].db.users_auth.find_one({"name": "dave"})["key_hashes"].__len__() == 1
    listed = runner.invoke(args=["users", "list"])
    assert listed.exit_code == 0 and "dave\tuser\tkeys=1" in listed.output and key1 not in listed.output
    rotated = runner.invoke(args=["users", "rotate", "dave"])
    key2 = key_of(rotated.output)
    assert rotated.exit_code == 0 and me(key2) == 200 and me(key1) == 401
    forced = runner.invoke(args=["users", "create", "dave", "--rotate", "--role", "admin"])
    key3 = key_of(forced.output)
    assert forced.exit_code == 0 and me(key3) == 200 and me(key2) == 401
    assert c.get("/auth/me", headers=key_headers(key3)).get_json()["role"] == "admin"
    revoked = runner.invoke(args=["users", "revoke", "dave"])
    assert revoked.exit_code == 0 and me(key3) == 401
    assert runner.invoke(args=["users", "revoke", "dave"]).exit_code != 0
    assert runner.invoke(args=["users", "rotate", "nobody"]).exit_code != 0


# ------------------------------------------------------------------ 7-10. hostile bodies write nothing


@pytest.fixture
def open_app(make_app: Any, fake_openai: Any) -> Any:
    return make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        LLM_MODEL="fake-model",
        RATE_LIMIT_ENABLED=False,
    )


def test_deep_json_and_lone_surrogates_are_json_4xx_and_write_nothing(open_app: Any) -> None:
    c, db = open_app.test_client(), open_app.extensions["services"].db
    before = counts(db)
    deep = "[" * 10_000 + "]" * 10_000
    resp = c.post("/ideation/generate", data=deep, content_type="application/json")
    assert resp.status_code == 400 and resp.is_json
    nested = json.dumps(ideation_body(selectedTexts=[json.loads("[" * 70 + "]" * 70)]))  # past MAX_JSON_DEPTH
    assert c.post("/storybook/books", data=nested, content_type="application/json").status_code == 400
    # a lone surrogate, next to a canvas that would otherwise be stored first (the orphan image)
    body = ideation_body(
        designTask="drone \ud800",
        selectedCanvasRecords=["data:image/png;base64," + __import__("base64").b64encode(png()).decode()],
    )
    resp = c.post("/ideation/generate", data=json.dumps(body), content_type="application/json")
    assert resp.status_code == 422 and resp.is_json, resp.get_data()
    assert resp.get_json()["success"] is False
    key = json.dumps({"description": "x", "pages": 1, "\udfff": 1})
    assert c.post("/storybook/books", data=key, content_type="application/json").status_code == 422
    form = c.post(
        "/ideation/upload",
        data={"file": (io.BytesIO(png()), "a.png"), "username": '"\\ud800"'},
        content_type="multipart/form-data",
    )
    assert form.status_code == 422 and form.is_json
    assert counts(db) == before


def test_decompression_bomb_is_refused_from_its_header_in_every_image_input(open_app: Any) -> None:
    import base64

    c, db = open_app.test_client(), open_app.extensions["services"].db
    bomb = png_bomb()
    assert len(bomb) < 100_000
    before = counts(db)
    started = time.perf_counter()
    resp = c.post(
        "/ideation/upload",
        data={"file": (io.BytesIO(bomb), "bomb.png", "image/png")},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 422 and resp.is_json, resp.get_data()
    resp = c.post(
        "/ideation/uploadImage",
        data={"file": (io.BytesIO(bomb), "bomb.png", "image/png")},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 422 and resp.is_json
    data_url = "data:image/png;base64," + base64.b64encode(bomb).decode()
    resp = c.post("/ideation/generate", json=ideation_body(selectedCanvasRecords=[data_url]))
    assert resp.status_code == 422 and resp.is_json
    resp = c.post(
        "/refinement/generate",
        json={"type": 1, "prompts": {"designTexts": ["wing"], "designImage": data_url}},
    )
    assert resp.status_code == 422 and resp.is_json, resp.get_json()
    assert time.perf_counter() - started < 10, "the pixels must not be decoded"
    assert counts(db) == before


def test_refused_storyteller_calls_write_nothing(make_app: Any, fake_openai: Any) -> None:
    app = make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        LLM_MODEL="fake-model",
        RATE_LIMIT_ENABLED=False,
        STORYTELLER_MAX_WORDS=200,
    )
    c, db = app.test_client(), app.extensions["services"].db
    session = secrets.token_urlsafe(16)
    settings = {
        "maincharacter": "a fox",
        "keywords": "moon",
        "genre": "Adventure",
        "registro": "Casual",
        "childsafe": True,
        "maxnowords": 1000,
        "twist": False,
        "session": session,
    }
    assert c.post("/storyteller/api/settings", json=settings).status_code == 422
    assert c.get(f"/storyteller/api/session?session={session}").status_code == 404  # read: creates nothing
    assert db.storyteller_sessions.count_documents({}) == 0
    settings["maxnowords"] = 100
    assert c.post("/storyteller/api/settings", json=settings).status_code == 200
    assert db.storyteller_sessions.count_documents({}) == 1
    # an empty selection is refused before the "edited" parent version would be stored
    resp = c.post(
        "/storyteller/api/rewrite",
        json={"session": session, "textbefore": "Once ", "textselected": "  ", "textafter": "upon a time."},
    )
    assert resp.status_code == 422 and resp.is_json
    assert db.storyteller_versions.count_documents({}) == 0


# ------------------------------------------------------------------ 15. the Host header is never stored


def test_the_clients_host_header_is_not_stored(open_app: Any, fake_openai: Any) -> None:
    from tests.test_storybook import story_responder

    fake_openai.set_responder(story_responder(fake_openai))
    c, db, svc = open_app.test_client(), open_app.extensions["services"].db, open_app.extensions["services"]
    evil = {"Host": "evil.example"}
    url = upload(c, png(), evil)
    assert url.startswith("http://evil.example/images/")  # answers keep absolute URLs (the frontends' shape)
    gen = c.post(
        "/ideation/generate", json=ideation_body(selectedCanvasRecords=[url]), headers=evil
    ).get_json()
    assert gen["success"] and all(
        u.startswith("http://evil.example/images/") for u in gen["data"].values()
    ), gen
    history = c.get("/ideation/users/10/history", headers=evil).get_json()["data"]
    assert history["requests"][0]["data"] == gen["data"]
    book = c.post("/storybook/books", json={"description": "a fox", "pages": 1}, headers=evil).get_json()
    wait_done(svc, book["id"], timeout=30)
    got = c.get(f"/storybook/books/{book['id']}", headers={"Host": "good.example"}).get_json()
    assert got["pages"][0]["illustration"].startswith("http://good.example/images/"), got["pages"][0]
    with c.get(f"/jobs/{book['id']}/events", headers=evil) as resp:
        assert "http://evil.example/images/" in resp.get_data(as_text=True)
    for name in db.list_collection_names():
        if name in ("images.chunks",):
            continue
        for doc in db[name].find():
            assert "evil.example" not in json_util.dumps(doc), (name, doc.get("_id"))


# ------------------------------------------------------------------ 11 + 12. real gunicorn


def _raw(base: str, payload: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


@pytest.mark.slow
def test_gunicorns_own_errors_are_json(gunicorn_server: Any) -> None:
    base = gunicorn_server(workers=1, RATE_LIMIT_ENABLED="false")
    cases = {
        414: b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        431: b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
        400: b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01Name: y\r\n\r\n",
    }
    for status, payload in cases.items():
        got, headers, body = _raw(base, payload)
        assert got == status, (status, got, body[:200])
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body)["error"]["status"] == status
    assert requests.get(f"{base}/ping", timeout=10).status_code == 200


def test_reaper_fails_expired_records_and_spares_live_ones(open_app: Any) -> None:
    from apps.core.jobs import reap_records

    db = open_app.extensions["services"].db
    now = datetime.now(UTC)
    db.ideation_requests.insert_many(
        [
            {
                "_id": "dead",
                "status": "working",
                "lease_until": now - timedelta(seconds=1),
                "created_at": now,
            },
            {
                "_id": "live",
                "status": "working",
                "lease_until": now + timedelta(seconds=60),
                "created_at": now,
            },
            {"_id": "done", "status": "done", "lease_until": now - timedelta(seconds=60), "created_at": now},
        ]
    )
    leased = open_app.extensions["services"].jobs.leased_collections
    assert "ideation_requests" in leased  # the ideation app declared it at start-up
    assert reap_records(db, leased) == 1
    dead = db.ideation_requests.find_one({"_id": "dead"})
    assert dead["status"] == "failed" and dead["error_code"] == "runner_died" and dead["error"]
    assert db.ideation_requests.find_one({"_id": "live"})["status"] == "working"
    assert db.ideation_requests.find_one({"_id": "done"})["status"] == "done"


@pytest.mark.slow
def test_ideation_request_of_a_killed_worker_ends_failed(
    gunicorn_server: Any, fake_openai: Any, mongo_client: Any, db_name: str
) -> None:
    from tests.test_faults import gunicorn_pids, until

    base = gunicorn_server(
        workers=2,
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        LLM_MODEL="fake-model",
        RATE_LIMIT_ENABLED="false",
        JOB_LEASE_S="3",
    )
    db = mongo_client[db_name]
    fake_openai.delay = 60  # the request sits in a model call when its worker dies

    def call() -> None:
        try:
            requests.post(f"{base}/ideation/generate", json=ideation_body(selectedTexts=["wing"]), timeout=90)
        except requests.RequestException:
            return  # the connection dies with the worker: expected

    threading.Thread(target=call, daemon=True).start()
    doc = until(lambda: db.ideation_requests.find_one({"status": "working"}), 20, "the request to start")
    worker_pid = int(doc["runner"].rsplit(":", 1)[1])
    assert worker_pid in gunicorn_pids(base)[1]
    killed_at = time.monotonic()
    os.kill(worker_pid, signal.SIGKILL)
    fake_openai.delay = 0.0
    until(
        lambda: db.ideation_requests.find_one({"_id": doc["_id"], "status": "failed"}),
        20,
        "the dead worker's request to be reaped",
    )
    assert time.monotonic() - killed_at < 20
    history = requests.get(f"{base}/ideation/users/10/history", timeout=10).json()["data"]["requests"]
    mine = next(r for r in history if r["id"] == doc["_id"])
    assert mine["status"] == "failed" and "stopped" in mine["error"]
