"""Refinement's client identity (stored on sessions, used to infer who sent an unattributed /generate) is
`request.remote_addr`: a client's own X-Forwarded-For header changes nothing; only ProxyFix
(PROXY_FIX_X_FOR>0, a trusted proxy in front) may rewrite the address."""

from __future__ import annotations

from typing import Any

from apps.refinement.attribution import Client

UA = "Mozilla/5.0 (study laptop)"
R3_ONE = {"appid": 0, "type": 0, "prompts": {"task": "设计一款运动辅助产品", "num": 1}}


def start(c: Any, username: str, addr: str, xff: str | None = None) -> str:
    headers = {"User-Agent": UA, **({"X-Forwarded-For": xff} if xff else {})}
    resp = c.post(
        "/refinement/paint/start",
        json={"username": username},
        headers=headers,
        environ_base={"REMOTE_ADDR": addr},
    )
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["data"]["sessionId"]


def stored_client(app: Any, session_id: str) -> str | None:
    return app.extensions["services"].db.refinement_sessions.find_one({"_id": session_id})["client"]


def test_spoofed_forwarded_for_does_not_change_the_recorded_client(client: Any, openai_app: Any) -> None:
    spoofed = start(client, "p01", "10.0.0.2", xff="10.0.0.1")
    assert stored_client(openai_app, spoofed) == Client.from_parts("10.0.0.2", UA).key
    assert stored_client(openai_app, spoofed) != Client.from_parts("10.0.0.1", UA).key


def test_spoofed_forwarded_for_cannot_borrow_another_clients_session(client: Any, openai_app: Any) -> None:
    victim = start(client, "victim", "10.0.0.1")
    resp = client.post(
        "/refinement/generate",
        json=R3_ONE,
        headers={"User-Agent": UA, "X-Forwarded-For": "10.0.0.1"},
        environ_base={"REMOTE_ADDR": "10.0.0.2"},
    )
    assert resp.status_code == 200, resp.get_json()
    doc = openai_app.extensions["services"].db.refinement_requests.find_one(
        {"_id": resp.get_json()["data"]["requestId"]}
    )
    assert doc["attribution"] == "anonymous" and doc["session"] != victim and doc["username"] is None


def test_trusted_proxy_address_comes_from_proxy_fix(make_app: Any, fake_openai: Any) -> None:
    app = make_app(
        LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k", PROXY_FIX_X_FOR=1
    )
    session = start(app.test_client(), "p02", "10.0.0.9", xff="198.51.100.4")
    assert stored_client(app, session) == Client.from_parts("198.51.100.4", UA).key
