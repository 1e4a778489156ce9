"""Storybook end to end: a real gunicorn (2 workers) with the fake model servers and an SD fleet,
read through the SSE stream with a real HTTP client; an SD instance dying mid-book; and the one
"first run" book on the embedded local model (real text, placeholder pictures).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tests.test_storybook import (
    LEGACY_KEYS,
    PNG_MAGIC,
    app_events,
    check_snapshot_rules,
    page_text,
    parse_sse,
    read,
    snapshots,
    story_responder,
)

AUTH = ("user", "pass")


def http_sse(
    url: str, headers: dict | None = None, timeout: float = 60.0
) -> tuple[list[dict[str, Any]], str]:
    """Read a whole SSE stream with `requests` (a real client over TCP)."""
    with requests.get(url, stream=True, timeout=timeout, headers=headers or {}) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = "".join(chunk for chunk in resp.iter_content(chunk_size=None, decode_unicode=True))
    return parse_sse([raw]), raw


def fetch_png(url: str, auth: tuple[str, str] | None = None) -> bytes:
    resp = requests.get(url, auth=auth, timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "image/png", url
    assert resp.content.startswith(PNG_MAGIC)
    return resp.content


@pytest.mark.slow
def test_book_through_gunicorn(gunicorn_server: Any, fake_openai: Any, fake_sd_fleet: Any) -> None:
    fake_openai.set_responder(story_responder(fake_openai))
    fleet = fake_sd_fleet(2, delay=0.05)
    base = gunicorn_server(
        workers=2,
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        SD_INSTANCES=",".join(f.url for f in fleet),
        AUTH_MODE="basic",
        BASIC_AUTH_USERNAME="user",
        BASIC_AUTH_PASSWORD="pass",
    )
    assert requests.get(f"{base}/storybook/", timeout=10).json() == {"status": "healthy"}
    resp = requests.get(
        f"{base}/storybook/get_storybook/", params={"des": "MostlyHarmless", "pgs": 5}, auth=AUTH, timeout=10
    )
    assert resp.status_code == 200
    task_id = resp.json()["task_id"]
    assert isinstance(task_id, int) and task_id < 2**53
    url = f"{base}/storybook/get_updates/{task_id}"
    events, raw = http_sse(url)
    assert ": stream open" in raw
    snaps = check_snapshot_rules(events, pages=5)
    final = snaps[-1]["data"]
    assert final["text_description"] == [page_text(i) for i in range(1, 6)]
    for image_url in [*final["illustrations"], final["cover"]]:
        assert image_url.startswith(base)
        fetch_png(image_url, AUTH)
    # both instances drew, and the records say which one drew what
    assert all(f.generation_requests() for f in fleet)
    # a reconnect (likely served by the other worker) resumes after Last-Event-ID
    resumed, _ = http_sse(url, headers={"Last-Event-ID": events[2]["id"]})
    assert [e["id"] for e in resumed] == [e["id"] for e in events[3:]]
    assert [e["data"] for e in resumed] == [e["data"] for e in events[3:]]
    out = requests.get(f"{base}/storybook/get_final_output", params={"task_id": task_id}, timeout=10).json()
    assert (
        list(out["final_output"])[:6] == LEGACY_KEYS
        and out["final_output"]["illustrations"] == final["illustrations"]
    )
    assert requests.get(f"{base}/storybook/get_updates/999", timeout=10).status_code == 404

    # the JSON API through the same server
    resp = requests.post(
        f"{base}/storybook/books",
        json={"description": "a robot learns to paint", "pages": 2},
        auth=AUTH,
        timeout=10,
    )
    assert resp.status_code == 202
    book = resp.json()
    events, _ = http_sse(
        base + book["links"]["events"], headers={"Authorization": resp.request.headers["Authorization"]}
    )
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done" and "page.delta" in kinds and kinds.count("page.image") == 2
    done = json.loads(events[-1]["data"])["book"]
    for page in done["pages"]:
        fetch_png(page["illustration"], AUTH)


def test_sd_instance_dying_mid_book_moves_to_the_other(
    make_app: Any, fake_openai: Any, fake_sd_fleet: Any
) -> None:
    fake_openai.set_responder(story_responder(fake_openai))
    fleet = fake_sd_fleet(2, delay=0.15)
    app = make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        SD_INSTANCES=",".join(f.url for f in fleet),
    )
    c = app.test_client()
    victim = fleet[0]
    book = c.post("/storybook/books", json={"description": "x", "pages": 6}).get_json()
    # kill one instance once it has started drawing (an event, not a sleep)
    assert victim.wait_until_running(timeout=10)
    victim.dead = True
    events, _ = read(c, book["links"]["events"])
    kinds = app_events(events)
    assert kinds[-1][0] == "done", kinds[-1]
    done = kinds[-1][1]["book"]
    assert all(p["illustration"] for p in done["pages"]) and done["cover"]["illustration"]
    assert any(p["instance"] == fleet[1].url for p in done["pages"])
    for page in done["pages"]:
        got = c.get(page["illustration"][page["illustration"].index("/images/") :])
        assert got.status_code == 200 and got.data.startswith(PNG_MAGIC)
    health = app.extensions["services"].image_provider.health()
    assert any(i["state"] == "down" for i in health["instances"])


@pytest.mark.slow
def test_first_run_book_on_the_embedded_model(make_app: Any) -> None:
    """No keys, no services: the embedded model plans and writes a real 2-page book."""
    app = make_app(LLM_PROVIDER="local", LOCAL_MAX_TOKENS=256)
    c = app.test_client()
    book = c.post(
        "/storybook/books", json={"description": "A shy hedgehog learns to ride a bicycle", "pages": 2}
    ).get_json()
    events, _ = read(c, book["links"]["events"])
    kinds = app_events(events)
    assert kinds[-1][0] == "done", kinds[-1]
    done = kinds[-1][1]["book"]
    assert done["title"] and len(done["pages"]) == 2
    for page in done["pages"]:
        assert len(page["text"].split()) >= 3 and "fake" not in page["text"].lower()
        assert page["illustration"].endswith(".png")
    assert any(k == "page.delta" for k, _ in kinds)
    legacy = snapshots(read(c, f"/storybook/get_updates/{book['legacy_id']}")[0])
    assert legacy[-1]["status"] == "done" and len(legacy[-1]["data"]["text_description"]) == 2
    records = list(app.extensions["services"].db.generations.find({"job": book["id"], "kind": "chat"}))
    assert {r["provider"] for r in records} == {"local"} and len(records) == 3
