"""Storybook (Rotate-Calvary): the original frontend's requests replayed (research note §8), the JSON
API, the pipeline's streaming and consistency features, and its failure paths. Fake model servers
on 127.0.0.1; the SSE streams are read to their terminal event (no sleeps as synchronisation).

Helpers at the top are shared with tests/test_storybook_e2e.py.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from typing import Any

import pytest

LEGACY_KEYS = ["user_input", "total_pages", "title", "text_description", "image_description", "illustrations"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ORIGIN = "https://picturebook-generator.vercel.app"


def basic(user: str = "user", password: str = "pass") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def parse_sse(chunks: Iterable[bytes | str]) -> list[dict[str, Any]]:
    """SSE text -> events ({"id", "event", "data"}); comments (`: ...`) are dropped."""
    events: list[dict[str, Any]] = []
    buffer = ""
    for chunk in chunks:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            event: dict[str, Any] = {}
            for line in block.split("\n"):
                if not line or line.startswith(":"):
                    continue
                key, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                event[key] = event[key] + "\n" + value if key in event else value
            if event:
                events.append(event)
    return events


def comments(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.startswith(":")]


def page_text(page: int) -> str:
    return f"Benny takes step number {page} across the red dust and waves at the two moons."


def story_responder(fake: Any) -> Any:
    """Plan requests get a schema-valid plan (quoted title, N pages); page requests a distinct text."""

    def respond(body: dict[str, Any]) -> Any:
        fmt = body.get("response_format") or {}
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
        if schema and "pages" in (schema.get("properties") or {}):
            n = schema["properties"]["pages"]["minItems"]
            return {
                "title": '"Benny Goes to Mars"',
                "characters": [{"name": "Benny", "appearance": "a small boy with a red scarf"}],
                "style": "watercolor, soft colors",
                "setting": "a dusty Mars colony",
                "pages": [
                    {"summary": f"step {i}", "scene": f"boy walking on mars, scene {i}"}
                    for i in range(1, n + 1)
                ],
            }
        user = next(
            (m["content"] for m in reversed(body.get("messages") or []) if m.get("role") == "user"), ""
        )
        if isinstance(user, str):
            match = re.search(r"write the text of page (\d+) of (\d+)", user)
            if match:
                return page_text(int(match.group(1)))
        return fake.default_reply(body)

    return respond


def snapshots(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The original frontend's view: parse data, skip keep-alive-looking data (starts with ':')."""
    out = []
    for event in events:
        data = event.get("data", "")
        if data.startswith(":"):
            continue
        out.append(json.loads(data))
    return out


def check_snapshot_rules(events: list[dict[str, Any]], pages: int) -> list[dict[str, Any]]:
    """§8 replay 10: the original stream's rules. Returns the parsed snapshots."""
    assert all("event" not in e for e in events), "the original frontend listens to onmessage: no event names"
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(set(ids)), "ids strictly increase"
    snaps = snapshots(events)
    assert snaps, "no snapshot"
    first = snaps[0]
    assert first == {"status": "working", "progress": {"total": 4, "current": 0}, "data": None}
    previous_current = 0
    previous_keys: list[str] = []
    for snap in snaps:
        assert list(snap)[:3] == ["status", "progress", "data"]
        assert snap["progress"]["total"] == 4
        assert snap["progress"]["current"] >= previous_current
        previous_current = snap["progress"]["current"]
        keys = [k for k in (snap["data"] or {}) if k in LEGACY_KEYS]
        assert keys == LEGACY_KEYS[: len(keys)], keys  # the original key order, growing only at the end
        assert len(keys) >= len(previous_keys)
        previous_keys = keys
    statuses = [s["status"] for s in snaps]
    assert statuses.count("done") == 1 and statuses[-1] == "done"
    assert set(statuses[:-1]) == {"working"}
    last = snaps[-1]["data"]
    assert last["total_pages"] == pages
    assert (
        len(last["text_description"]) == len(last["image_description"]) == len(last["illustrations"]) == pages
    )
    return snaps


# ---------------------------------------------------------------------------------------------- fixtures

CREDS = {"AUTH_MODE": "basic", "BASIC_AUTH_USERNAME": "user", "BASIC_AUTH_PASSWORD": "pass"}
AUTH = basic()


def openai_settings(fake: Any) -> dict[str, Any]:
    return {
        "LLM_PROVIDER": "openai",
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": "k",
        "LLM_MODEL": "fake-model",
    }


@pytest.fixture
def story_fake(fake_openai: Any) -> Any:
    fake_openai.set_responder(story_responder(fake_openai))
    return fake_openai


@pytest.fixture
def app(make_app: Any, story_fake: Any) -> Any:
    return make_app(**openai_settings(story_fake), **CREDS)


@pytest.fixture
def c(app: Any) -> Any:
    return app.test_client()


def start(c: Any, des: str = "MostlyHarmless", pgs: int = 3, headers: dict | None = None) -> int:
    resp = c.get(
        f"/storybook/get_storybook/?des={des}&pgs={pgs}", headers=AUTH if headers is None else headers
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    task_id = resp.get_json()["task_id"]
    assert isinstance(task_id, int) and 0 < task_id < 2**53
    return task_id


def read(c: Any, url: str, headers: dict | None = None) -> tuple[list[dict[str, Any]], str]:
    """Read a whole SSE response (it ends after the terminal event)."""
    resp = c.get(url, headers=headers or {})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "text/event-stream"
    raw = resp.get_data(as_text=True)
    return parse_sse([raw]), raw


def read_until(c: Any, url: str, stop: Any, headers: dict | None = None) -> list[dict[str, Any]]:
    """Read events until stop(events) is true, then disconnect."""
    resp = c.get(url, headers=headers or {}, buffered=False)
    events: list[dict[str, Any]] = []
    buffer = ""
    try:
        for chunk in resp.response:
            buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
            *blocks, buffer = buffer.split("\n\n")
            for block in blocks:
                events.extend(parse_sse([block + "\n\n"]))
            if stop(events):
                break
    finally:
        resp.close()
    return events


def png_at(c: Any, url: str, headers: dict | None = None) -> bytes:
    assert url.startswith("http") and url.endswith(".png")
    got = c.get(url[url.index("/images/") :], headers=headers or {})
    assert got.status_code == 200 and got.mimetype == "image/png"
    assert got.data.startswith(PNG_MAGIC)
    return got.data


def app_events(events: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(e.get("event"), json.loads(e["data"])) for e in events]


# ---------------------------------------------------------------------------------------------- §8 replay


def test_1_health_with_and_without_slash(c: Any) -> None:
    for path in ("/storybook/", "/storybook"):
        resp = c.get(path)
        assert resp.status_code == 200 and resp.get_json() == {"status": "healthy"}


def test_2_task_id_returned_before_any_model_call_finishes(c: Any, app: Any, story_fake: Any) -> None:
    story_fake.delay = 0.3
    task_id = start(c, pgs=5)
    job = app.extensions["services"].jobs.find_one({"app": "storybook", "legacy_id": task_id})
    assert job["status"] in ("queued", "working") and job["owner"] == "user"
    story_fake.delay = 0.0  # the rest of the book at full speed
    events, _ = read(c, f"/storybook/get_updates/{task_id}")
    assert snapshots(events)[-1]["status"] == "done"


def test_3_frontend_encoded_url(c: Any, app: Any) -> None:
    task_id = start(c, des="Set%20in%20the%20cowboy%20bebop%20universe%2C%20Benny%20goes%20to%20Mars", pgs=2)
    book = app.extensions["services"].db.storybooks.find_one({"legacy_id": task_id})
    assert book["input"]["description"] == "Set in the cowboy bebop universe, Benny goes to Mars"
    assert book["input"]["pages"] == 2


def test_4_5_auth_401s_in_fastapi_shape_before_validation(c: Any, story_fake: Any) -> None:
    resp = c.get("/storybook/get_storybook/?des=x&pgs=5")
    assert resp.status_code == 401 and resp.get_json() == {"detail": "Not authenticated"}
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    resp = c.get("/storybook/get_storybook/?des=x&pgs=5", headers=basic("user", "wrong"))
    assert resp.status_code == 401 and resp.get_json() == {"detail": "Incorrect username or password"}
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    # the original resolved auth before the query: 401 wins over 422
    resp = c.get("/storybook/get_storybook/?des=x&pgs=abc")
    assert resp.status_code == 401 and resp.get_json() == {"detail": "Not authenticated"}
    assert not story_fake.chat_requests()


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ("des=x", ["query", "pgs"]),  # 6: missing
        ("des=x&pgs=abc", ["query", "pgs"]),  # 7: not an integer
        ("des=x&pgs=0", ["query", "pgs"]),
        ("des=x&pgs=21", ["query", "pgs"]),
        ("pgs=3", ["query", "des"]),
        ("des=%20%20%20&pgs=3", ["query", "des"]),  # blank after trimming
        ("des=" + "a" * 2001 + "&pgs=3", ["query", "des"]),
    ],
)
def test_6_7_validation_422_locations(c: Any, query: str, loc: list[str]) -> None:
    resp = c.get(f"/storybook/get_storybook/?{query}", headers=AUTH)
    assert resp.status_code == 422, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["detail"][0]["loc"] == loc
    assert body["detail"][0]["msg"]


def test_page_limit_is_configurable(make_app: Any, story_fake: Any) -> None:
    c = make_app(**openai_settings(story_fake), STORYBOOK_MAX_PAGES=4).test_client()
    resp = c.get("/storybook/get_storybook/?des=x&pgs=5")
    assert resp.status_code == 422 and "between 1 and 4" in resp.get_json()["detail"][0]["msg"]
    resp = c.post("/storybook/books", json={"description": "x", "pages": 5})
    assert resp.status_code == 422 and resp.get_json()["detail"][0]["loc"] == ["body", "pages"]
    # 2000 characters after trimming is fine
    resp = c.post("/storybook/books", json={"description": "  " + "a" * 2000 + "  ", "pages": 1})
    assert resp.status_code == 202


def test_8_no_slash_form_is_served_not_redirected(c: Any) -> None:
    resp = c.get("/storybook/get_storybook?des=x&pgs=3", headers=AUTH)
    assert resp.status_code == 200 and isinstance(resp.get_json()["task_id"], int)


@pytest.mark.parametrize("origins", [None, f"http://localhost:3000,{ORIGIN}"])
def test_9_cors_preflight(make_app: Any, story_fake: Any, origins: str | None) -> None:
    extra = {"CORS_ORIGINS": origins} if origins else {}
    c = make_app(**openai_settings(story_fake), **CREDS, **extra).test_client()
    resp = c.open(
        "/storybook/get_storybook/",
        method="OPTIONS",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert resp.status_code == 200
    if origins:  # listed origins: echoed, with credentials (the original's list)
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    else:  # the default `*`: any origin, never credentials
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in resp.headers
    assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()


def test_10_snapshot_stream(c: Any, app: Any) -> None:
    task_id = start(c, pgs=5)
    resp = c.get(f"/storybook/get_updates/{task_id}")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache"
    raw = resp.get_data(as_text=True)
    assert comments(raw) and all(line.startswith(": ") for line in comments(raw))  # real SSE comments
    events = parse_sse([raw])
    assert not any(e["data"].startswith(":") for e in events)  # no keep-alive as data
    snaps = check_snapshot_rules(events, pages=5)
    final = snaps[-1]["data"]
    assert final["user_input"] == "MostlyHarmless"
    assert final["title"] == "Benny Goes to Mars"  # quotes stripped
    assert final["text_description"] == [page_text(i) for i in range(1, 6)]
    assert final["image_description"] == [f"boy walking on mars, scene {i}" for i in range(1, 6)]
    for url in [*final["illustrations"], final["cover"]]:
        png_at(c, url, AUTH)
    assert len(set(final["illustrations"])) == 5
    # page texts appear as they are written: some snapshot shows a page's text before it is final
    assert any(
        len(s["data"]["text_description"]) > len(s["data"].get("image_description", []))
        for s in snaps
        if s["data"] and "text_description" in s["data"]
    )


def test_11_12_unknown_and_malformed_task_ids(c: Any) -> None:
    resp = c.get("/storybook/get_updates/999")
    assert resp.status_code == 404 and resp.get_json() == {"error": "Invalid task id"}
    resp = c.get(f"/storybook/get_updates/{2**80}")
    assert resp.status_code == 404 and resp.get_json() == {"error": "Invalid task id"}
    resp = c.get("/storybook/get_updates/abc")
    assert resp.status_code == 422 and resp.get_json()["detail"][0]["loc"] == ["path", "task_id"]


def test_13_final_output_is_scoped(c: Any, app: Any) -> None:
    from apps.core.auth import create_user

    assert c.get("/storybook/get_final_output").get_json() == {"final_output": {}}
    assert c.get("/storybook/get_final_output", headers=AUTH).get_json() == {"final_output": {}}
    task_id = start(c, pgs=5)
    read(c, f"/storybook/get_updates/{task_id}")
    mine = c.get("/storybook/get_final_output", headers=AUTH).get_json()["final_output"]
    assert list(mine)[:6] == LEGACY_KEYS
    assert (
        mine["user_input"] == "MostlyHarmless" and mine["total_pages"] == 5 and isinstance(mine["title"], str)
    )
    assert all(isinstance(mine[k], list) and len(mine[k]) == 5 for k in LEGACY_KEYS[3:])
    by_task = c.get(f"/storybook/get_final_output?task_id={task_id}").get_json()
    assert by_task["final_output"] == mine and by_task["status"] == "done"
    # not everybody's last book: another user and an anonymous caller see nothing
    create_user(app.extensions["services"].db, "other", password="pw")
    assert c.get("/storybook/get_final_output", headers=basic("other", "pw")).get_json() == {
        "final_output": {}
    }
    assert c.get("/storybook/get_final_output").get_json() == {"final_output": {}}
    resp = c.get("/storybook/get_final_output", headers=basic("other", "bad"))
    assert resp.status_code == 401 and resp.get_json() == {"detail": "Incorrect username or password"}
    resp = c.get("/storybook/get_final_output?task_id=12345")
    assert resp.status_code == 404 and resp.get_json() == {"error": "Invalid task id"}


def test_14_moderation_flag_fails_the_stream_with_a_reason(c: Any, app: Any, story_fake: Any) -> None:
    story_fake.flag_words = {"bomb"}
    task_id = start(c, des="how%20to%20build%20a%20bomb", pgs=3)
    events, _ = read(c, f"/storybook/get_updates/{task_id}")
    snaps = snapshots(events)
    assert snaps[0]["progress"]["current"] == 0
    last = snaps[-1]
    assert last["status"] == "failed" and last["data"] is None
    assert last["error"]["code"] == "moderated" and last["error"]["step"] == "moderation"
    assert "flagged" in last["error"]["message"] and "violence" in last["error"]["message"]
    assert [s["status"] for s in snaps].count("failed") == 1
    assert not story_fake.chat_requests()  # nothing was generated from flagged input
    svc = app.extensions["services"]
    job = svc.jobs.find_one({"legacy_id": task_id})
    assert job["status"] == "failed" and job["error"]["code"] == "moderated"
    assert svc.db.storybooks.find_one({"legacy_id": task_id})["status"] == "failed"
    out = c.get(f"/storybook/get_final_output?task_id={task_id}").get_json()
    assert out["final_output"] == {} and out["status"] == "failed" and out["error"]["code"] == "moderated"


def test_14b_local_keyword_moderation(make_app: Any, story_fake: Any) -> None:
    c = make_app(**openai_settings(story_fake), MODERATION="local").test_client()
    book = c.post("/storybook/books", json={"description": "a story about torture", "pages": 2}).get_json()
    events, _ = read(c, f"/storybook/books/{book['id']}/events")
    kinds = app_events(events)
    assert kinds[-1][0] == "failed" and kinds[-1][1]["error"]["code"] == "moderated"
    error = next(d for k, d in kinds if k == "error")
    assert error["provider"] == "local-keyword-check" and error["step"] == "moderation"


def test_15_last_event_id_resumes_without_loss_or_duplicates(c: Any, story_fake: Any) -> None:
    story_fake.stream_delay = 0.01
    task_id = start(c, pgs=3)
    url = f"/storybook/get_updates/{task_id}"
    first = read_until(c, url, lambda evs: len(evs) >= 2)
    assert len(first) == 2
    rest, _ = read(c, url, headers={"Last-Event-ID": first[-1]["id"]})
    whole, _ = read(c, url)
    assert [e["id"] for e in first + rest] == [e["id"] for e in whole]
    assert [e["data"] for e in first + rest] == [e["data"] for e in whole]
    check_snapshot_rules(first + rest, pages=3)
    # resuming after the end sends nothing more and closes
    tail, _ = read(c, url, headers={"Last-Event-ID": whole[-1]["id"]})
    assert tail == []


# ---------------------------------------------------------------------------------------------- the JSON API


@pytest.fixture
def open_app(make_app: Any, story_fake: Any) -> Any:
    return make_app(**openai_settings(story_fake))


def test_books_api_streams_page_deltas_and_keeps_the_book(
    open_app: Any, story_fake: Any, tmp_path: Any
) -> None:
    c = open_app.test_client()
    body = {
        "description": "Benny goes to Mars",
        "pages": 3,
        "style": "crayon drawing, <lora:kids:0.7>",
        "main_character": {"name": "Benny", "appearance": "a tiny robot with green eyes"},
        "characters": [{"name": "Ein", "appearance": "a clever corgi"}],
        "setting": "Olympus Mons at dawn",
        "language": "English",
        "model": "story-model-2",
        "temperature": 0.3,
        "seed": 1234,
        "user": "alice",
    }
    resp = c.post("/storybook/books", json=body)
    assert resp.status_code == 202, resp.get_json()
    book = resp.get_json()
    assert (
        book["status"] in ("queued", "working") and book["owner"] == "alice" and book["pages_requested"] == 3
    )
    assert resp.headers["Location"] == f"/storybook/books/{book['id']}"
    assert book["links"]["events"] == f"/storybook/books/{book['id']}/events"
    events, _ = read(c, book["links"]["events"])
    kinds = app_events(events)
    types = [k for k, _ in kinds]
    assert types[-1] == "done" and types.count("done") == 1
    assert types.index("book.plan") < types.index("page.delta")
    for page in (1, 2, 3):
        deltas = [d["delta"] for k, d in kinds if k == "page.delta" and d["page"] == page]
        text_at = next(i for i, (k, d) in enumerate(kinds) if k == "page.text" and d["page"] == page)
        first_delta_at = next(i for i, (k, d) in enumerate(kinds) if k == "page.delta" and d["page"] == page)
        assert deltas and first_delta_at < text_at
        assert "".join(deltas) == page_text(page) == kinds[text_at][1]["text"]
    assert sorted(d["page"] for k, d in kinds if k == "page.image") == [1, 2, 3]
    assert [k for k in types if k == "cover"] == ["cover"]
    done = kinds[-1][1]["book"]
    assert done["status"] == "done" and done["title"] == "Benny Goes to Mars"
    # the reader's choices reach the model and every picture (the character/style sheet)
    assert done["sheet"]["characters"][:2] == [body["main_character"], *body["characters"]]
    assert done["sheet"]["style"] == body["style"] and done["sheet"]["setting"] == body["setting"]
    for page in done["pages"]:
        for part in ("a tiny robot with green eyes", "a clever corgi", "<lora:kids:0.7>", "Olympus Mons"):
            assert part in page["image_prompt"], part
        png_at(c, page["illustration"])
    assert "a tiny robot with green eyes" in done["cover"]["image_prompt"]
    png_at(c, done["cover"]["illustration"])
    chats = [r["json"] for r in story_fake.chat_requests()]
    assert len(chats) == 1 + 3  # the plan, then one streamed call per page
    assert all(r["model"] == "story-model-2" and r["temperature"] == 0.3 for r in chats)
    assert not chats[0].get("stream") and all(r.get("stream") for r in chats[1:])
    assert "Benny (a tiny robot with green eyes)" in chats[0]["messages"][-1]["content"]
    assert "Ein (a clever corgi)" in chats[0]["messages"][-1]["content"]
    assert "Ein: a clever corgi" in chats[2]["messages"][-1]["content"]  # the sheet reaches every page
    assert page_text(1) in chats[2]["messages"][-1]["content"]  # page 2 sees page 1
    # one seed for every picture, recorded with each generation
    svc = open_app.extensions["services"]
    images = list(svc.db.generations.find({"job": book["id"], "kind": "image"}))
    assert len(images) == 4 and {g["params"]["seed"] for g in images} == {1234}
    # kept, readable and listed
    again = c.get(f"/storybook/books/{book['id']}").get_json()
    assert again["status"] == "done" and [p["text"] for p in again["pages"]] == [
        page_text(i) for i in (1, 2, 3)
    ]
    listed = c.get("/storybook/books?user=alice").get_json()["books"]
    assert [b["id"] for b in listed] == [book["id"]] and listed[0]["cover"].endswith(".png")
    assert c.get("/storybook/books?user=bob").get_json()["books"] == []
    job = c.get(f"/jobs/{book['id']}").get_json()
    assert job["status"] == "done" and job["progress"]["current"] == job["progress"]["total"] == 8
    assert svc.db.storybooks.find_one({"_id": book["id"]})["legacy_id"] == book["legacy_id"]
    # finished books are exported with the study data
    from apps.core.export import export_study

    with open_app.app_context():
        counts = export_study(svc.db, tmp_path / "export", app="storybook", catalog=svc.exports, user="alice")
    assert counts["storybooks"] == 1 and counts["images"] == 4
    exported = (tmp_path / "export" / "storybooks.jsonl").read_text()
    assert book["id"] in exported and page_text(2) in exported


def test_books_api_validation(open_app: Any) -> None:
    c = open_app.test_client()
    cases = [
        ({"pages": 2}, ["body", "description"]),
        ({"description": "x" * 2001, "pages": 2}, ["body", "description"]),
        ({"description": " ", "pages": 2}, ["body", "description"]),
        ({"description": "x", "pages": 0}, ["body", "pages"]),
        ({"description": "x", "pages": "many"}, ["body", "pages"]),
        ({"description": "x", "pages": 2, "temperature": 3}, ["body", "temperature"]),
        (
            {"description": "x", "pages": 2, "main_character": {"appearance": "tall"}},
            ["body", "main_character", "name"],
        ),
        ({"description": "x", "pages": 2, "colour": "red"}, ["body", "colour"]),
        ({"description": "x", "pages": 2, "model": "bad model name!"}, ["body", "model"]),
    ]
    for body, loc in cases:
        resp = c.post("/storybook/books", json=body)
        assert resp.status_code == 422, (body, resp.get_json())
        assert resp.get_json()["detail"][0]["loc"] == loc, body
    assert c.post("/storybook/books", data="nope", content_type="application/json").status_code == 400
    assert c.get("/storybook/books/does-not-exist").status_code == 404


def test_page_one_is_complete_long_before_the_last_page(
    make_app: Any, story_fake: Any, fake_sd_fleet: Any
) -> None:
    fleet = fake_sd_fleet(2, delay=0.05)
    c = make_app(**openai_settings(story_fake), SD_INSTANCES=",".join(f.url for f in fleet)).test_client()
    story_fake.delay = 0.1
    book = c.post("/storybook/books", json={"description": "a walk on Mars", "pages": 4}).get_json()
    events, _ = read(c, book["links"]["events"])
    kinds = app_events(events)
    position = {(k, d.get("page")): i for i, (k, d) in enumerate(kinds) if isinstance(d, dict)}
    page1_done = max(position[("page.text", 1)], position[("page.image", 1)])
    assert page1_done < position[("page.text", 4)]
    # pictures were submitted in page order and spread over both instances
    instances = {d["instance"] for k, d in kinds if k == "page.image"}
    assert len(instances) == 2


def test_chain_images_draws_each_page_from_the_previous_one(
    make_app: Any, story_fake: Any, fake_sd_fleet: Any
) -> None:
    fleet = fake_sd_fleet(2)
    c = make_app(**openai_settings(story_fake), SD_INSTANCES=",".join(f.url for f in fleet)).test_client()
    book = c.post(
        "/storybook/books", json={"description": "x", "pages": 3, "chain_images": True, "seed": 77}
    ).get_json()
    events, _ = read(c, book["links"]["events"])
    assert app_events(events)[-1][0] == "done"
    requests = [r for f in fleet for r in f.generation_requests()]
    img2img = [r for r in requests if r["path"].endswith("/img2img")]
    txt2img = [r for r in requests if r["path"].endswith("/txt2img")]
    assert len(img2img) == 2 and len(txt2img) == 2  # page 1 and the cover from scratch, pages 2-3 chained
    assert all(r["json"]["init_images"] for r in img2img)
    assert {r["json"]["seed"] for r in requests} == {77}


def test_cancel_stops_the_book(open_app: Any, story_fake: Any) -> None:
    c = open_app.test_client()
    story_fake.stream_delay = 0.05
    book = c.post("/storybook/books", json={"description": "a long story", "pages": 6}).get_json()
    url = book["links"]["events"]
    seen = read_until(c, url, lambda evs: any(e.get("event") == "page.delta" for e in evs))
    assert seen
    resp = c.delete(f"/storybook/books/{book['id']}")
    assert resp.status_code == 200
    events, _ = read(c, url, headers={"Last-Event-ID": seen[-1]["id"]})
    assert events[-1]["event"] == "cancelled"
    assert not any(e.get("event") == "page.text" and json.loads(e["data"])["page"] == 6 for e in events)
    svc = open_app.extensions["services"]
    assert svc.db.storybooks.find_one({"_id": book["id"]})["status"] == "cancelled"
    assert c.get(f"/storybook/books/{book['id']}").get_json()["status"] == "cancelled"


def test_books_are_private_when_auth_is_on(app: Any) -> None:
    from apps.core.auth import create_user

    db = app.extensions["services"].db
    create_user(db, "alice", password="a")
    create_user(db, "bob", password="b")
    c = app.test_client()
    book = c.post(
        "/storybook/books", json={"description": "x", "pages": 1}, headers=basic("alice", "a")
    ).get_json()
    assert book["owner"] == "alice"
    assert c.post("/storybook/books", json={"description": "x", "pages": 1}).status_code == 401
    assert c.get(f"/storybook/books/{book['id']}", headers=basic("bob", "b")).status_code == 404
    assert c.get(f"/storybook/books/{book['id']}/events", headers=basic("bob", "b")).status_code == 404
    read(c, book["links"]["events"], headers=basic("alice", "a"))
    assert c.get("/storybook/books", headers=basic("bob", "b")).get_json()["books"] == []
    assert len(c.get("/storybook/books?user=bob", headers=basic("alice", "a")).get_json()["books"]) == 1
    # the admin pair may look at anyone's
    assert len(c.get("/storybook/books?user=alice", headers=AUTH).get_json()["books"]) == 1


# ---------------------------------------------------------------------------------------------- failure paths


def test_model_500s_exhausted_end_the_book_failed(app: Any, c: Any, story_fake: Any) -> None:
    story_fake.fail_next(500, times=10, endpoint="chat")
    task_id = start(c, pgs=3)
    events, _ = read(c, f"/storybook/get_updates/{task_id}")
    last = snapshots(events)[-1]
    assert last["status"] == "failed" and last["error"]["code"] == "model_error"
    assert last["error"]["step"] == "plan" and "500" in last["error"]["message"]
    settings = app.extensions["services"].settings
    assert len(story_fake.chat_requests()) == settings.LLM_MAX_RETRIES + 1
    book = app.extensions["services"].db.storybooks.find_one({"legacy_id": task_id})
    assert book["status"] == "failed" and "language model" in book["error"]["message"]


def test_a_stream_broken_half_way_rewrites_the_page(open_app: Any, story_fake: Any) -> None:
    c = open_app.test_client()
    story_fake.drop_stream_after(3)  # the first streamed page breaks after a few words
    book = c.post("/storybook/books", json={"description": "x", "pages": 2}).get_json()
    events, _ = read(c, book["links"]["events"])
    kinds = app_events(events)
    assert kinds[-1][0] == "done"
    resets = [d for k, d in kinds if k == "page.reset"]
    assert [r["page"] for r in resets] == [1]
    assert [p["text"] for p in kinds[-1][1]["book"]["pages"]] == [page_text(1), page_text(2)]
    # the legacy view drops the half-written text when the page restarts
    task_id = book["legacy_id"]
    snaps = snapshots(read(c, f"/storybook/get_updates/{task_id}")[0])
    assert snaps[-1]["data"]["text_description"] == [page_text(1), page_text(2)]


def test_only_sd_instance_dead_fails_with_a_clear_message(
    make_app: Any, story_fake: Any, fake_sd_fleet: Any
) -> None:
    (sd,) = fake_sd_fleet(1)
    sd.dead = True
    c = make_app(**openai_settings(story_fake), SD_INSTANCES=sd.url, SD_WAIT_TIMEOUT_S=1.0).test_client()
    book = c.post("/storybook/books", json={"description": "x", "pages": 2}).get_json()
    events, _ = read(c, book["links"]["events"])
    kinds = app_events(events)
    assert kinds[-1][0] == "failed"
    error = kinds[-1][1]["error"]
    assert error["code"] == "model_error" and "illustration" in error["message"]
    legacy = snapshots(read(c, f"/storybook/get_updates/{book['legacy_id']}")[0])[-1]
    assert legacy["status"] == "failed" and legacy["error"]["step"] == "illustrations"


def test_root_mount_and_openapi(make_app: Any, story_fake: Any) -> None:
    """ROOT_APP=storybook serves the original's root paths (its frontend calls `{API}get_storybook/`)."""
    app = make_app(**openai_settings(story_fake), **CREDS, ROOT_APP="storybook")
    c = app.test_client()
    assert c.get("/").get_json() == {"status": "healthy"}
    resp = c.get("/get_storybook/?des=x&pgs=1")
    assert resp.status_code == 401 and resp.get_json() == {"detail": "Not authenticated"}
    task_id = start(c, pgs=1)  # the prefixed form still works too
    resp = c.get("/get_storybook?des=MostlyHarmless&pgs=1", headers=AUTH)
    assert resp.status_code == 200
    events, _ = read(c, f"/get_updates/{resp.get_json()['task_id']}")
    check_snapshot_rules(events, pages=1)
    assert c.get(f"/storybook/get_final_output?task_id={task_id}").status_code == 200
    book = c.post("/books", json={"description": "x", "pages": 1}, headers=AUTH).get_json()
    assert book["links"]["self"] == f"/books/{book['id']}"
    paths = c.get("/openapi.json").get_json()["paths"]
    for path in (
        "/storybook/get_storybook/",
        "/storybook/get_updates/{task_id}",
        "/storybook/get_final_output",
        "/storybook/books",
        "/storybook/books/{book_id}",
        "/storybook/books/{book_id}/events",
    ):
        assert path in paths, path


def test_title_page_and_prompt_cleanup() -> None:
    from apps.storybook.book_prompts import plan_schema
    from apps.storybook.service import new_legacy_id
    from apps.storybook.text_cleanup import clean_page, clean_title, plan_field, tidy_tags

    assert (
        clean_title('"The Adventures of Benny"') == "The Adventures of Benny"
    )  # the original kept the quotes
    assert clean_title("Title: “Moon Dust”\nby GPT") == "Moon Dust"
    assert clean_title("**Benny**") == "Benny" and clean_title("  ") == "Untitled"
    assert clean_page("Page 2: Benny ran.") == "Benny ran."
    assert clean_page('**Page 3 of 5:** "Hi there."') == "Hi there."
    assert clean_page('She said "hi" and "bye".') == 'She said "hi" and "bye".'  # inner quotes stay
    assert (
        clean_page("I'm so happy to help you create books! Benny ran.") == "Benny ran."
    )  # assistant chatter
    assert tidy_tags(",, red fox,  a hill ,\n dawn, ,") == "red fox, a hill, dawn"
    # a plan field left as template syntax (SmolLM2 wrote the first one for a scene) falls back
    for leaked in ("{ {story}}, [{ description }}", "Benny {{ name }}", "{page}: a hill", "{% if x %}", " "):
        assert plan_field(leaked, "a fox on a hill") == "a fox on a hill", leaked
    assert plan_field(" Benny counts {1, 2} ", "x") == "Benny counts {1, 2}"  # other braces stay
    schema = plan_schema({"properties": {"pages": {"type": "array", "minItems": 1, "maxItems": 20}}}, 7)
    assert schema["properties"]["pages"]["minItems"] == schema["properties"]["pages"]["maxItems"] == 7
    ids = {new_legacy_id() for _ in range(200)}
    assert len(ids) == 200 and all(2**32 <= i < 2**53 for i in ids)
