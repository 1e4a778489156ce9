"""Storyteller WebSocket `/ws` against a real server (research note §10 replay 8, 9, 12, 13): raw text
frames by default, JSON mode, close codes, cancel and disconnect, per-session isolation, gunicorn."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import free_port
from tests.test_storyteller_support import P, live_server, ws_read, ws_url

PREFIX = "/storyteller"
LONG = " ".join(f"word{i}." for i in range(80))  # 80 one-word sentences: the app streams sentence by sentence


@pytest.fixture
def base(openai_app: Any) -> Iterator[str]:
    with live_server(openai_app) as url:
        yield url


def test_raw_text_frames_then_close_1000(base: str, fake_openai: Any) -> None:
    http = requests.Session()
    prompt = http.post(base + f"{PREFIX}/setstory/", json=P, timeout=10).json()[0]
    fake_openai.script("Once upon a time.")
    # no cookie, no session: the original page's socket (another host name) finds this client's session
    got = ws_read(ws_url(base))
    assert got.code == 1000
    assert got.frames and all(isinstance(f, str) and f for f in got.frames)  # empty deltas are skipped
    assert got.text == "Once upon a time."
    assert fake_openai.last_chat()["messages"][-1]["content"] == prompt
    versions = http.get(base + f"{PREFIX}/api/versions", timeout=10).json()["versions"]
    assert [(v["kind"], v["text"]) for v in versions] == [("generated", "Once upon a time.")]


def test_redo_then_socket_streams_before_new_part_after(base: str, fake_openai: Any) -> None:
    http = requests.Session()
    http.post(base + f"{PREFIX}/setstory/", json=P, timeout=10)
    fake_openai.script("Once upon a time.")
    assert ws_read(ws_url(base)).text == "Once upon a time."
    redo = http.post(
        base + f"{PREFIX}/redopartstory/",
        json={"textbefore": "Once upon", "textselected": " a time", "textafter": "."},
        timeout=10,
    )
    assert redo.status_code == 200
    fake_openai.script("a midnight hour")
    got = ws_read(ws_url(base))
    assert got.code == 1000
    assert got.frames[0] == "Once upon "  # the unchanged beginning comes first, as one frame
    assert got.text == "Once upon a midnight hour."
    assert got.text.startswith("Once upon") and got.text.endswith(".")


def test_json_mode_messages(base: str, fake_openai: Any) -> None:
    http = requests.Session()
    sid = http.post(base + f"{PREFIX}/setstory/", json=P, timeout=10).headers["X-Storyteller-Session"]
    fake_openai.script("Once upon a time.")
    got = ws_read(ws_url(base, session=sid, format="json"))
    assert got.code == 1000
    messages = got.json()
    assert messages[0] == {"type": "start", "session": sid, "kind": "generated"}
    deltas = [m["text"] for m in messages if m["type"] == "delta"]
    # whole sentences: the app checks each for instruction echo before anyone sees it
    assert deltas == ["Once upon a time."]
    done = messages[-1]
    assert done["type"] == "done" and done["story"] == "Once upon a time." and done["n"] == 1
    version = http.get(base + f"{PREFIX}/api/versions/{done['version']}", timeout=10).json()
    assert version["text"] == "Once upon a time."


def test_concurrent_sessions_are_isolated(base: str, fake_openai: Any) -> None:
    fake_openai.stream_delay = 0.02
    names = {"alice": "Alice Liddell", "bruno": "Bruno Munari"}
    sessions: dict[str, str] = {}
    cookies: dict[str, requests.Session] = {}
    for key, name in names.items():
        http = requests.Session()
        resp = http.post(base + f"{PREFIX}/setstory/", json={**P, "maincharacter": name}, timeout=10)
        sessions[key] = resp.headers["X-Storyteller-Session"]
        cookies[key] = http

    both_asked = threading.Barrier(2, timeout=10)  # each reply waits for the other request: truly concurrent

    # each reply names the characters of the prompt it answers
    def reply(body: dict[str, Any]) -> str:
        both_asked.wait()
        user = body["messages"][-1]["content"]
        who = next(n for n in names.values() if n in user)
        return f"A story about {who}, told slowly in many small words."

    fake_openai.set_responder(reply)
    results: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def run(key: str) -> None:
        barrier.wait()
        results[key] = ws_read(ws_url(base, session=sessions[key]))

    threads = [threading.Thread(target=run, args=(k,)) for k in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for key, name in names.items():
        assert results[key].code == 1000
        assert results[key].text == f"A story about {name}, told slowly in many small words."
        versions = cookies[key].get(base + f"{PREFIX}/api/versions", timeout=10).json()["versions"]
        assert len(versions) == 1 and name in versions[0]["prompt"] and name in versions[0]["text"]
    prompts = [r["json"]["messages"][-1]["content"] for r in fake_openai.chat_requests()]
    assert sorted(sum(name in p for name in names.values()) for p in prompts) == [1, 1]


def test_model_down_closes_1011_with_reason(make_app: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=dead, LLM_MAX_RETRIES=1)
    with live_server(app) as url:
        http = requests.Session()
        sid = http.post(url + f"{PREFIX}/setstory/", json=P, timeout=10).headers["X-Storyteller-Session"]
        got = ws_read(ws_url(url, session=sid))
        assert got.code == 1011 and got.frames == []
        assert got.reason and "model" in got.reason
        got = ws_read(ws_url(url, session=sid, format="json"))
        assert got.code == 1011
        last = got.json()[-1]
        assert last["type"] == "error" and "cannot reach" in last["message"]
        assert http.get(url + f"{PREFIX}/api/versions", timeout=10).json()["versions"] == []


def _wait_for_record(db: Any, deadline_s: float = 10.0) -> dict[str, Any]:
    """The stream's `generations` record is written when the model stream is closed."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        doc = db.generations.find_one({"app": "storyteller"})
        if doc is not None:
            return doc
        time.sleep(0.05)
    raise AssertionError("no generation record")


def test_cancel_message_stops_the_model_stream(openai_app: Any, fake_openai: Any) -> None:
    fake_openai.stream_delay = 0.05  # 82 chunks: about 4 s when nothing stops it
    fake_openai.script(LONG)
    db = openai_app.extensions["services"].db
    with live_server(openai_app) as url:
        http = requests.Session()
        sid = http.post(url + f"{PREFIX}/setstory/", json=P, timeout=10).headers["X-Storyteller-Session"]
        started = time.monotonic()
        got = ws_read(ws_url(url, session=sid, format="json"), cancel_after=4)
        assert time.monotonic() - started < 3.0
        assert got.code == 1000
        last = got.json()[-1]
        assert last["type"] == "cancelled" and 0 < len(last["text"]) < len(LONG)
        record = _wait_for_record(db)
        assert len(record["output"]) < len(LONG)  # the model stream was closed early
        assert http.get(url + f"{PREFIX}/api/versions", timeout=10).json()["versions"] == []


def test_disconnect_stops_the_model_stream(openai_app: Any, fake_openai: Any) -> None:
    fake_openai.stream_delay = 0.05
    fake_openai.script(LONG)
    db = openai_app.extensions["services"].db
    with live_server(openai_app) as url:
        http = requests.Session()
        sid = http.post(url + f"{PREFIX}/setstory/", json=P, timeout=10).headers["X-Storyteller-Session"]
        got = ws_read(ws_url(url, session=sid), close_after=2)
        assert len(got.frames) == 2
        record = _wait_for_record(db)
        assert record["output"] and len(record["output"]) < len(LONG)
        assert http.get(url + f"{PREFIX}/api/versions", timeout=10).json()["versions"] == []


def test_api_cancel_stops_a_stream_from_another_request(openai_app: Any, fake_openai: Any) -> None:
    fake_openai.stream_delay = 0.05
    fake_openai.script(LONG)
    with live_server(openai_app) as url:
        http = requests.Session()
        sid = http.post(url + f"{PREFIX}/setstory/", json=P, timeout=10).headers["X-Storyteller-Session"]
        results: list[Any] = []
        reader = threading.Thread(
            target=lambda: results.append(ws_read(ws_url(url, session=sid, format="json")))
        )
        reader.start()
        assert fake_openai.wait_for_requests(1, kind="chat")
        assert http.post(url + f"{PREFIX}/api/cancel", json={"session": sid}, timeout=10).json()["cancelled"]
        reader.join(10)
        assert results and results[0].json()[-1]["type"] == "cancelled"


def test_http_get_on_the_socket_path_is_not_a_socket(base: str) -> None:
    resp = requests.get(base + f"{PREFIX}/ws", timeout=10)
    assert resp.status_code == 400


@pytest.mark.slow
def test_websocket_under_gunicorn_workers(gunicorn_server: Any, fake_openai: Any) -> None:
    url = gunicorn_server(
        workers=2, LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k"
    )
    fake_openai.set_responder(
        lambda body: "Gunicorn " + body["messages"][-1]["content"].split("names are ")[1][:5]
    )
    for name in ("Alpha", "Omega"):
        http = requests.Session()
        sid = http.post(url + f"{PREFIX}/setstory/", json={**P, "maincharacter": name}, timeout=30).headers[
            "X-Storyteller-Session"
        ]
        got = ws_read(ws_url(url, session=sid))
        assert got.code == 1000 and got.text == f"Gunicorn {name}"
        versions = http.get(url + f"{PREFIX}/api/versions", timeout=10).json()["versions"]
        assert [v["text"] for v in versions] == [f"Gunicorn {name}"]


def test_model_errors_in_json_mode_end_with_an_error_message(openai_app: Any, fake_openai: Any) -> None:
    with live_server(openai_app) as url:
        http = requests.Session()
        sid = http.post(url + f"{PREFIX}/setstory/", json=P, timeout=10).headers["X-Storyteller-Session"]
        fake_openai.fail_next(500, times=10)
        got = ws_read(ws_url(url, session=sid, format="json"))
        assert got.code == 1011
        last = got.json()[-1]
        assert last["type"] == "error" and "HTTP 500" in last["message"]
