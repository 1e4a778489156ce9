"""Storyteller with auth on: the page signs in with a key and streams with a session-scoped token
(issue 17 item 4). API part here; the browser part is in tests/test_storyteller_browser_auth.py."""

from __future__ import annotations

from typing import Any

import pytest

from apps.core.auth import create_user

SETTINGS = {
    "maincharacter": "Mia",
    "keywords": "lighthouse",
    "genre": "Mystery",
    "registro": "Vivid",
    "childsafe": True,
    "maxnowords": 100,
    "twist": False,
}
SID, OTHER = "sessionAAAA1111", "sessionBBBB2222"


@pytest.fixture
def app(make_app: Any, fake_openai: Any) -> Any:
    return make_app(
        LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k", AUTH_MODE="apikey"
    )


def _token(c: Any, key: str, session: str) -> str:
    resp = c.post("/storyteller/api/stream-token", json={"session": session}, headers={"X-API-Key": key})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["session"] == session and body["stream_url"].startswith(f"stream?session={session}&token=")
    return body["token"]


def test_session_token_opens_only_that_sessions_streams(app: Any, fake_openai: Any) -> None:
    db = app.extensions["services"].db
    alice, bob = create_user(db, "alice"), create_user(db, "bob")
    c = app.test_client()
    for key, sid in ((alice, SID), (bob, OTHER)):
        assert (
            c.post(
                "/storyteller/api/settings", json={**SETTINGS, "session": sid}, headers={"X-API-Key": key}
            ).status_code
            == 200
        )
    token = _token(c, alice, SID)
    fake_openai.script("Once upon a time.")
    resp = c.get(f"/storyteller/stream?session={SID}&action=story&token={token}")
    assert resp.status_code == 200 and "event: done" in resp.get_data(as_text=True)
    assert c.get(f"/storyteller/stream?session={SID}&action=story").status_code == 401  # no token, no key
    # the token opens nothing else: another session's stream, the JSON API, a job stream, other users' data
    assert c.get(f"/storyteller/stream?session={OTHER}&action=story&token={token}").status_code == 401
    assert c.get(f"/storyteller/api/session?session={SID}&token={token}").status_code == 401
    assert c.get(f"/storyteller/api/versions?session={SID}&token={token}").status_code == 401
    assert c.get(f"/jobs/{SID}/events?token={token}").status_code in (401, 404)  # no such job either
    assert c.get(f"/ideation/users/alice/history?token={token}&session={SID}").status_code == 401


def test_token_only_for_own_existing_session(app: Any) -> None:
    db = app.extensions["services"].db
    alice, bob = create_user(db, "alice"), create_user(db, "bob")
    c = app.test_client()
    c.post("/storyteller/api/settings", json={**SETTINGS, "session": SID}, headers={"X-API-Key": alice})
    refused = c.post("/storyteller/api/stream-token", json={"session": SID}, headers={"X-API-Key": bob})
    assert refused.status_code == 404
    assert c.post("/storyteller/api/stream-token", json={"session": SID}).status_code == 401
    assert (
        c.post(
            "/storyteller/api/stream-token", json={"session": "nosuchsession1"}, headers={"X-API-Key": alice}
        ).status_code
        == 404
    )
    assert db.storyteller_sessions.count_documents({"_id": "nosuchsession1"}) == 0
