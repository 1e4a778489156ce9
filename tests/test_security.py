"""Access control, stream tokens, rate limits and the daily model-call cap.

User A must not read, stream, cancel or guess user B's jobs and images (core routes) nor
B's data in the apps' own history routes (discovered from /openapi.json, so routes that
land later are covered too). Limits are counted in MongoDB: two app instances on one
database share them.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from PIL import Image

from apps.core.auth import create_user, make_stream_token, read_stream_token
from tests.test_storybook import story_responder

SECRET = "test-secret-key"


def png(color: str = "red", size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def key_headers(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


@pytest.fixture
def secured(make_app: Any, fake_openai: Any) -> dict[str, Any]:
    """An apikey app (fake OpenAI, placeholder images) with users alice, bob and admin."""
    app = make_app(
        AUTH_MODE="apikey",
        SECRET_KEY=SECRET,
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        LLM_MODEL="fake-model",
        RATE_LIMIT_DEFAULT="10000/minute",
        RATE_LIMIT_GENERATE="10000/minute",
    )
    db = app.extensions["services"].db
    keys = {name: create_user(db, name) for name in ("alice", "bob")}
    keys["admin"] = create_user(db, "root", role="admin")
    return {
        "app": app,
        "client": app.test_client(),
        "svc": app.extensions["services"],
        "h": {name: key_headers(k) for name, k in keys.items()},
    }


def quick_job(svc: Any, owner: str, gate: threading.Event | None = None) -> str:
    def runner(ctx: Any) -> dict:
        ctx.event("tick", {"owner": owner})
        if gate is not None:
            gate.wait(10)
        return {"secret": f"{owner}'s result"}

    return svc.jobs.submit(kind="test", app="core", runner=runner, owner=owner)


def wait_done(svc: Any, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = svc.jobs.get(job_id)
        if doc["status"] in ("done", "failed", "cancelled"):
            return doc
        assert time.monotonic() < deadline, f"job {job_id} still {doc['status']}"
        time.sleep(0.02)


# ------------------------------------------------------------------ stream tokens (pure)


def test_stream_token_is_signed_scoped_and_expires() -> None:
    from apps.core.auth import User

    secret = b"k" * 32
    token, expires = make_stream_token(secret, User("alice"), "job123456", ttl_s=60, now=1000.0)
    assert expires == 1060
    payload = read_stream_token(secret, token, now=1001.0)
    assert payload == {"u": "alice", "r": "user", "j": "job123456", "exp": 1060}
    assert read_stream_token(secret, token, now=1061.0) is None  # expired
    assert read_stream_token(b"other" * 8, token, now=1001.0) is None  # another server's secret
    body, sig = token.split(".")
    forged_body = body[:-2] + ("AA" if body[-2:] != "AA" else "BB")
    assert read_stream_token(secret, f"{forged_body}.{sig}", now=1001.0) is None
    assert read_stream_token(secret, "garbage", now=1001.0) is None
    assert read_stream_token(secret, "", now=1001.0) is None


# ------------------------------------------------------------------ core routes


def test_jobs_are_visible_to_their_owner_and_admins_only(secured: dict[str, Any]) -> None:
    client, svc, h = secured["client"], secured["svc"], secured["h"]
    job = quick_job(svc, "bob")
    wait_done(svc, job)
    assert client.get(f"/jobs/{job}").status_code == 401  # no credentials
    assert client.get(f"/jobs/{job}", headers={"X-API-Key": "csk_wrong"}).status_code == 401
    mine = client.get(f"/jobs/{job}", headers=h["bob"])
    assert mine.status_code == 200 and mine.get_json()["result"] == {"secret": "bob's result"}
    assert client.get(f"/jobs/{job}", headers=h["admin"]).status_code == 200
    theirs = client.get(f"/jobs/{job}", headers=h["alice"])
    assert theirs.status_code == 404 and "bob" not in theirs.get_data(as_text=True)
    # a missing job and someone else's job look the same (no existence oracle)
    missing = client.get("/jobs/doesnotexist123", headers=h["alice"])
    assert missing.status_code == theirs.status_code == 404
    assert client.get(f"/jobs/{job}/events", headers=h["alice"]).status_code == 404
    assert client.delete(f"/jobs/{job}", headers=h["alice"]).status_code == 404
    events = client.get(f"/jobs/{job}/events", headers=h["bob"])
    assert events.status_code == 200 and "bob's result" not in events.get_data(as_text=True)
    assert "event: done" in events.get_data(as_text=True)


def test_images_are_owner_only_and_unguessable(secured: dict[str, Any]) -> None:
    client, svc, h = secured["client"], secured["svc"], secured["h"]
    ids = [svc.images.save(png(), app="storybook", user="bob") for _ in range(20)]
    assert len(set(ids)) == 20
    for image_id in ids:
        # secrets.token_urlsafe(18): 24 url-safe characters, 144 random bits
        assert re.fullmatch(r"[A-Za-z0-9_-]{24}", image_id)
    image = ids[0]
    assert client.get(f"/images/{image}.png").status_code == 401
    got = client.get(f"/images/{image}.png", headers=h["bob"])
    assert got.status_code == 200 and got.data.startswith(b"\x89PNG")
    assert client.get(f"/images/{image}.png", headers=h["admin"]).status_code == 200
    denied = client.get(f"/images/{image}.png", headers=h["alice"])
    assert denied.status_code == 404 and not denied.data.startswith(b"\x89PNG")
    # guessing: neighbours of a real id (one character changed) are not images
    for i in range(5):
        flipped = image[:i] + ("A" if image[i] != "A" else "B") + image[i + 1 :]
        assert client.get(f"/images/{flipped}.png", headers=h["alice"]).status_code == 404


def test_image_access_link_serves_the_unguessable_url_without_credentials(make_app: Any) -> None:
    """IMAGE_ACCESS=link: an <img src> without credentials works, other data stays owner-only."""
    app = make_app(AUTH_MODE="apikey", SECRET_KEY=SECRET, IMAGE_ACCESS="link")
    svc = app.extensions["services"]
    client = app.test_client()
    bob = key_headers(create_user(svc.db, "bob"))
    image = svc.images.save(png("blue"), app="storybook", user="bob")
    got = client.get(f"/images/{image}.png")
    assert got.status_code == 200 and got.data.startswith(b"\x89PNG")
    assert client.get(f"/images/{image[:-1]}{'A' if image[-1] != 'A' else 'B'}.png").status_code == 404
    job = quick_job(svc, "bob")
    assert client.get(f"/jobs/{job}").status_code == 401  # only images are share links
    assert client.get(f"/jobs/{job}", headers=bob).status_code == 200


def test_stream_token_opens_an_event_stream_without_headers(secured: dict[str, Any]) -> None:
    client, svc, h = secured["client"], secured["svc"], secured["h"]
    job = quick_job(svc, "bob")
    other = quick_job(svc, "bob")
    wait_done(svc, job)
    wait_done(svc, other)
    # alice cannot get a token for bob's job; bob can
    assert client.post("/auth/stream-token", json={"job_id": job}, headers=h["alice"]).status_code == 404
    assert client.post("/auth/stream-token", json={"job_id": job}).status_code == 401
    reply = client.post("/auth/stream-token", json={"job_id": job}, headers=h["bob"])
    assert reply.status_code == 200, reply.get_data(as_text=True)
    body = reply.get_json()
    token = body["token"]
    assert body["stream_url"] == f"/jobs/{job}/events?token={token}" and body["expires_in"] > 0
    stream = client.get(body["stream_url"])  # no headers: what EventSource does
    assert stream.status_code == 200 and stream.mimetype == "text/event-stream"
    assert "event: done" in stream.get_data(as_text=True)
    assert client.get(f"/jobs/{job}?token={token}").status_code == 200  # any GET naming that job
    # scoped to the job: the same token does not open bob's other job
    assert client.get(f"/jobs/{other}/events?token={token}").status_code == 401
    # not a general credential: no POST/DELETE with it
    assert client.delete(f"/jobs/{job}?token={token}").status_code == 401
    # tampered and expired tokens
    assert client.get(f"/jobs/{job}/events?token={token[:-3]}xyz").status_code == 401
    old, _ = make_stream_token(SECRET.encode(), None, job, ttl_s=10, now=time.time() - 3600)
    assert client.get(f"/jobs/{job}/events?token={old}").status_code == 401
    # a token bob made for his job, presented by alice's session, still only opens bob's job
    resp = client.get(f"/jobs/{job}/events?token={token}", headers=h["alice"])
    assert resp.status_code == 404  # headers win over the token: alice is alice


def test_auth_me(secured: dict[str, Any], make_app: Any) -> None:
    client, h = secured["client"], secured["h"]
    assert client.get("/auth/me").status_code == 401
    me = client.get("/auth/me", headers=h["alice"]).get_json()
    assert me == {"auth_mode": "apikey", "authenticated": True, "user": "alice", "role": "user"}
    assert client.get("/auth/me", headers=h["admin"]).get_json()["role"] == "admin"
    bearer = client.get("/auth/me", headers={"Authorization": "Bearer " + h["bob"]["X-API-Key"]}).get_json()
    assert bearer["user"] == "bob"
    open_app = make_app(AUTH_MODE="none")
    assert open_app.test_client().get("/auth/me").get_json() == {
        "auth_mode": "none",
        "authenticated": False,
        "user": None,
        "role": None,
    }


def test_basic_mode_users_and_the_storybook_pair(make_app: Any) -> None:
    import base64

    app = make_app(
        AUTH_MODE="basic", BASIC_AUTH_USERNAME="story", BASIC_AUTH_PASSWORD="teller", SECRET_KEY=SECRET
    )
    create_user(app.extensions["services"].db, "carol", password="pw-carol")
    client = app.test_client()

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert client.get("/auth/me", headers=basic("carol", "pw-carol")).get_json()["user"] == "carol"
    pair = client.get("/auth/me", headers=basic("story", "teller")).get_json()
    assert pair["user"] == "story" and pair["role"] == "admin"
    wrong = client.get("/auth/me", headers=basic("carol", "nope"))
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"].startswith("Basic")
    # a verified password is remembered briefly (scrypt is slow on purpose), but a changed one is not
    assert client.get("/auth/me", headers=basic("carol", "pw-carol")).status_code == 200
    create_user(app.extensions["services"].db, "carol", password="pw-new", rotate=True)
    assert client.get("/auth/me", headers=basic("carol", "pw-carol")).status_code == 401
    assert client.get("/auth/me", headers=basic("carol", "pw-new")).status_code == 200


# ------------------------------------------------------------------ the apps' own routes


def _openapi_paths(client: Any) -> dict[str, Any]:
    return client.get("/openapi.json").get_json()["paths"]


def _bob_creates_data(client: Any, h: dict[str, dict[str, str]], paths: dict[str, Any]) -> None:
    """Give bob something to find in each app that is mounted (cheap, no model calls)."""
    for app_name in ("ideation", "refinement"):
        if f"/{app_name}/paint/start" in paths:
            resp = client.post(f"/{app_name}/paint/start", json={"username": "bob"}, headers=h["bob"])
            assert resp.status_code == 200, resp.get_data(as_text=True)


def test_username_paths_are_owner_only_in_every_app(secured: dict[str, Any]) -> None:
    """Every GET route with a `{username}` path parameter answers alice's request for bob with 404."""
    client, h = secured["client"], secured["h"]
    paths = _openapi_paths(client)
    _bob_creates_data(client, h, paths)
    user_paths = [p for p, ops in paths.items() if "{username}" in p and "get" in ops]
    if not user_paths:
        raise AssertionError("no app with per-user GET routes is mounted yet")
    checked = []
    for template in user_paths:
        url = template.replace("{username}", "bob")
        if "{" in url:
            continue  # needs another id too: covered by the app-specific tests below
        as_bob = client.get(url, headers=h["bob"])
        as_alice = client.get(url, headers=h["alice"])
        as_admin = client.get(url, headers=h["admin"])
        assert as_alice.status_code in (403, 404), (
            url,
            as_alice.status_code,
            as_alice.get_data(as_text=True),
        )
        assert as_bob.status_code not in (401, 403), (url, as_bob.status_code)
        assert as_admin.status_code == as_bob.status_code, url
        # nothing of bob's in alice's answer
        assert '"bob"' not in as_alice.get_data(as_text=True), url
        checked.append(url)
    assert checked
    # bob's data really exists where the app keeps a workspace: the 404 above is access control
    if "/ideation/users/{username}" in paths:
        assert client.get("/ideation/users/bob", headers=h["bob"]).status_code == 200


def test_storybook_books_are_owner_only(secured: dict[str, Any], fake_openai: Any) -> None:
    # a model that writes page texts (the fake's default reply quotes the page instructions, which the
    # storybook drops as an echo: the book would fail for want of text)
    fake_openai.set_responder(story_responder(fake_openai))
    client, svc, h = secured["client"], secured["svc"], secured["h"]
    if "/storybook/books" not in _openapi_paths(client):
        raise AssertionError("storybook /books not mounted")
    created = client.post(
        "/storybook/books", json={"description": "a fox learns to fly", "pages": 1}, headers=h["bob"]
    )
    assert created.status_code == 202, created.get_data(as_text=True)
    book = created.get_json()["id"]
    wait_done(svc, book, timeout=30)
    assert client.get(f"/storybook/books/{book}", headers=h["bob"]).status_code == 200
    assert client.get(f"/storybook/books/{book}", headers=h["alice"]).status_code == 404
    assert client.get(f"/storybook/books/{book}/events", headers=h["alice"]).status_code == 404
    assert client.delete(f"/storybook/books/{book}", headers=h["alice"]).status_code == 404
    listed = client.get("/storybook/books?user=bob", headers=h["alice"])
    assert listed.status_code == 200 and book not in listed.get_data(as_text=True)
    assert book in client.get("/storybook/books", headers=h["bob"]).get_data(as_text=True)
    assert book in client.get("/storybook/books?user=bob", headers=h["admin"]).get_data(as_text=True)
    # the images of bob's book are bob's
    for image in svc.db["images.files"].find({"metadata.job": book}, {"_id": 1}):
        assert client.get(f"/images/{image['_id']}.png", headers=h["alice"]).status_code == 404
        assert client.get(f"/images/{image['_id']}.png", headers=h["bob"]).status_code == 200
    # the book's own SSE route takes the stream token too (book id == job id)
    token = client.post("/auth/stream-token", json={"job_id": book}, headers=h["bob"]).get_json()["token"]
    stream = client.get(f"/storybook/books/{book}/events?token={token}")
    assert stream.status_code == 200 and "event: done" in stream.get_data(as_text=True)


def test_storyteller_sessions_are_owner_only(secured: dict[str, Any]) -> None:
    client, h = secured["client"], secured["h"]
    paths = _openapi_paths(client)
    if "/storyteller/api/settings" not in paths:
        raise AssertionError("storyteller JSON API not mounted")
    settings = {
        "maincharacter": "Ada",
        "keywords": "bob-only-keyword",
        "genre": "Adventure",
        "registro": "Casual",
        "childsafe": True,
        "maxnowords": 100,
        "twist": False,
    }
    made = client.post("/storyteller/api/settings", json=settings, headers=h["bob"])
    assert made.status_code == 200, made.get_data(as_text=True)
    session = made.get_json()["session"]
    fresh = secured["app"].test_client()  # no cookie jar shared with bob
    for url in (
        f"/storyteller/api/session?session={session}",
        f"/storyteller/api/versions?session={session}",
    ):
        theirs = fresh.get(url, headers=h["alice"])
        assert theirs.status_code == 404, (url, theirs.status_code)
        assert "bob-only-keyword" not in theirs.get_data(as_text=True)
        assert client.get(url, headers=h["bob"]).status_code == 200
    if "/storyteller/api/edit" in paths and "/storyteller/api/versions/{version_id}" in paths:
        edit = client.post(
            "/storyteller/api/edit",
            json={"session": session, "text": "bob's private draft"},
            headers=h["bob"],
        )
        assert edit.status_code == 201, edit.get_data(as_text=True)
        version = edit.get_json()["id"]
        assert client.get(f"/storyteller/api/versions/{version}", headers=h["bob"]).status_code == 200
        theirs = fresh.get(f"/storyteller/api/versions/{version}", headers=h["alice"])
        assert theirs.status_code == 404 and "private draft" not in theirs.get_data(as_text=True)
        # alice cannot write into bob's session either
        assert (
            fresh.post(
                "/storyteller/api/edit", json={"session": session, "text": "x"}, headers=h["alice"]
            ).status_code
            == 404
        )


def test_refinement_sessions_are_owner_only(secured: dict[str, Any]) -> None:
    client, h = secured["client"], secured["h"]
    paths = _openapi_paths(client)
    if "/refinement/paint/start" not in paths or "/refinement/sessions/{session_id}" not in paths:
        raise AssertionError("refinement history routes not mounted")
    started = client.post("/refinement/paint/start", json={"username": "bob"}, headers=h["bob"])
    assert started.status_code == 200, started.get_data(as_text=True)
    session = (started.get_json().get("data") or {}).get("sessionId")
    if not session:
        raise AssertionError("refinement paint/start returns no sessionId")
    assert client.get(f"/refinement/sessions/{session}", headers=h["bob"]).status_code == 200
    theirs = client.get(f"/refinement/sessions/{session}", headers=h["alice"])
    assert theirs.status_code == 404 and theirs.get_json()["success"] is False


# ------------------------------------------------------------------ rate limits


def test_rate_limit_429_json_with_retry_after_per_user(make_app: Any) -> None:
    app = make_app(AUTH_MODE="apikey", SECRET_KEY=SECRET, RATE_LIMIT_DEFAULT="5/minute")
    db = app.extensions["services"].db
    alice, bob = key_headers(create_user(db, "alice")), key_headers(create_user(db, "bob"))
    client = app.test_client()
    codes = [client.get("/auth/me", headers=alice).status_code for _ in range(5)]
    assert codes == [200] * 5
    over = client.get("/auth/me", headers=alice)
    assert over.status_code == 429
    body = over.get_json()
    assert body["error"]["code"] == "rate_limited" and "retry in" in body["error"]["message"]
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    assert client.get("/auth/me", headers=bob).status_code == 200  # bob has his own bucket
    assert client.get("/health", headers=alice).status_code in (200, 503)  # probes are exempt
    assert client.get("/ping", headers=alice).status_code == 200


def test_rate_limit_envelope_apps_and_generation_bucket(make_app: Any) -> None:
    app = make_app(RATE_LIMIT_DEFAULT="100/minute", RATE_LIMIT_GENERATE="2/minute")
    client = app.test_client()
    paths = _openapi_paths(client)
    if "/ideation/generate" not in paths:
        raise AssertionError("ideation not mounted")
    # the generation bucket counts requests that start model work, valid or not
    first = [client.post("/ideation/generate", json={}).status_code for _ in range(2)]
    assert 429 not in first
    over = client.post("/ideation/generate", json={})
    assert over.status_code == 429
    body = over.get_json()
    assert body["success"] is False and "generation" in body["message"]  # the envelope app's shape
    assert int(over.headers["Retry-After"]) >= 1
    # other routes still have budget
    assert client.get("/ideation/ping").status_code == 200


def test_rate_limits_are_shared_across_app_instances(make_app: Any) -> None:
    """Two app instances (think: two workers or hosts) on one database share one bucket: exactly with
    RATE_LIMIT_BATCH_S=0, and after one flush interval with the default batching."""
    first = make_app(RATE_LIMIT_DEFAULT="6/minute", RATE_LIMIT_BATCH_S=0)
    second = make_app(RATE_LIMIT_DEFAULT="6/minute", RATE_LIMIT_BATCH_S=0)
    a, b = first.test_client(), second.test_client()
    codes = [a.get("/auth/me").status_code for _ in range(3)] + [
        b.get("/auth/me").status_code for _ in range(3)
    ]
    assert codes == [200] * 6
    assert b.get("/auth/me").status_code == 429
    assert a.get("/auth/me").status_code == 429


def test_batched_rate_limits_are_shared_after_a_flush(make_app: Any) -> None:
    first = make_app(RATE_LIMIT_DEFAULT="6/minute", RATE_LIMIT_BATCH_S=0.05)
    second = make_app(RATE_LIMIT_DEFAULT="6/minute", RATE_LIMIT_BATCH_S=0.05)
    a, b = first.test_client(), second.test_client()
    assert [a.get("/auth/me").status_code for _ in range(3)] == [200] * 3
    time.sleep(0.3)  # a's hits reach the shared counter
    assert [b.get("/auth/me").status_code for _ in range(3)] == [200] * 3
    assert b.get("/auth/me").status_code == 429
    time.sleep(0.3)
    assert a.get("/auth/me").status_code == 429
    counters = first.extensions["services"].db.ratelimit_counters
    deadline = time.monotonic() + 5  # a's last hit is counted in a and reaches MongoDB at its next flush
    while sum(doc["count"] for doc in counters.find()) != 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(doc["count"] for doc in counters.find()) == 8


def test_rate_limit_can_be_switched_off(make_app: Any) -> None:
    client = make_app(RATE_LIMIT_ENABLED=False, RATE_LIMIT_DEFAULT="1/minute").test_client()
    assert [client.get("/auth/me").status_code for _ in range(5)] == [200] * 5


def test_bad_rate_limit_setting_fails_at_start(make_app: Any) -> None:
    with pytest.raises(ValueError):
        make_app(RATE_LIMIT_DEFAULT="lots per minute")


# ------------------------------------------------------------------ daily model-call cap


def test_daily_model_call_cap(make_app: Any) -> None:
    app = make_app(AUTH_MODE="apikey", SECRET_KEY=SECRET, MODEL_DAILY_CALL_CAP=3)
    svc = app.extensions["services"]
    db = svc.db
    keys = {n: key_headers(create_user(db, n)) for n in ("alice", "bob")}
    keys["root"] = key_headers(create_user(db, "root", role="admin"))
    client = app.test_client()
    paths = _openapi_paths(client)
    gen = (
        "/ideation/generate"
        if "/ideation/generate" in paths
        else next((p for p in paths if p.startswith("/storybook/") and "post" in paths[p]), None)
    )
    if gen is None:
        raise AssertionError("no generation route mounted")
    now = datetime.now(UTC)
    rows = [{"user": "alice", "kind": "chat", "created_at": now - timedelta(minutes=i)} for i in range(3)]
    rows += [{"user": "bob", "kind": "moderation", "created_at": now} for _ in range(5)]  # free: not counted
    rows += [
        {"user": "bob", "kind": "chat", "created_at": now - timedelta(days=1, hours=1)} for _ in range(5)
    ]
    rows += [{"user": "root", "kind": "chat", "created_at": now} for _ in range(5)]
    db.generations.insert_many(rows)
    capped = client.post(gen, json={}, headers=keys["alice"])
    assert capped.status_code == 429, capped.get_data(as_text=True)
    text = json.dumps(capped.get_json())
    assert "resets at" in text and "3 of 3" in text
    tomorrow = (now + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00Z")
    assert tomorrow in text
    assert 0 < int(capped.headers["Retry-After"]) <= 86400
    assert client.post(gen, json={}, headers=keys["bob"]).status_code != 429  # moderation + yesterday's calls
    assert client.post(gen, json={}, headers=keys["root"]).status_code != 429  # admins are exempt
    assert client.get("/auth/me", headers=keys["alice"]).status_code == 200  # only model work is capped


def test_daily_cap_is_off_without_auth(make_app: Any) -> None:
    app = make_app(MODEL_DAILY_CALL_CAP=1)
    app.extensions["services"].db.generations.insert_many(
        [{"user": None, "kind": "chat", "created_at": datetime.now(UTC)} for _ in range(3)]
    )
    client = app.test_client()
    if "/ideation/generate" not in _openapi_paths(client):
        raise AssertionError("ideation not mounted")
    assert client.post("/ideation/generate", json={}).status_code != 429


# ------------------------------------------------------------------ size limits


def test_oversized_body_is_json_413(make_app: Any) -> None:
    client = make_app(MAX_CONTENT_LENGTH=1024).test_client()
    resp = client.post("/auth/stream-token", data=b"x" * 4096, content_type="application/json")
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] == "payload_too_large"
