"""Storyteller REST contract (research note §10 replay 1-7, 9-11), sessions, versions, rewrites, feedback,
dataset export. Real app on its own database, the fake OpenAI server over HTTP, Flask's test client."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from agent.prompts import PromptLibrary
from config import PROJECT_ROOT
from tests.test_storyteller_support import ORIGINAL_ROW1_PROMPT, P

PREFIX = "/storyteller"


def sse_events(resp: Any) -> list[dict[str, Any]]:
    """The JSON data of each SSE event of a finished /stream response."""
    events = []
    for block in resp.get_data(as_text=True).split("\n\n"):
        data = [line[6:] for line in block.splitlines() if line.startswith("data: ")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


def write(client: Any, session: str | None = None, action: str = "next") -> dict[str, Any]:
    """Run one generation over SSE; returns the `done` event (fails on anything else)."""
    query = f"?action={action}" + (f"&session={session}" if session else "")
    resp = client.get(f"{PREFIX}/stream{query}")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    events = sse_events(resp)
    assert events and events[-1]["type"] == "done", events
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert text == events[-1]["story"]
    return events[-1]


# --------------------------------------------------------------------------- replay 1-7


def test_setstory_returns_the_prompt_as_a_one_element_array(client: Any) -> None:
    resp = client.post(f"{PREFIX}/setstory/", json=P)
    assert resp.status_code == 200
    body = resp.get_json()
    assert isinstance(body, list) and len(body) == 1
    prompt = body[0]
    for part in ("100", "Paolo", "Thriller", "Conversational register", "aliens"):
        assert part in prompt
    assert prompt.endswith("an introduction, a development and a finale.")
    session = resp.headers["X-Storyteller-Session"]
    assert f"storyteller_session={session}" in resp.headers["Set-Cookie"]
    state = client.get(f"{PREFIX}/api/session").get_json()
    assert state["session"] == session and state["prompt"] == prompt
    assert state["settings"]["registro"] == "Conversational"


def test_original_template_is_byte_exact() -> None:
    library = PromptLibrary(PROJECT_ROOT / "settings")
    rendered = library.render(
        "storyteller/story_original",
        {
            "characters": "Paolo",
            "keywords": "aliens",
            "genre": "Thriller",
            "register": "Conversational",
            "max_words": 100,
            "child_friendly": False,
            "twist": False,
        },
    )
    assert [m["role"] for m in rendered.messages] == ["user"]
    assert rendered.messages[0]["content"] == ORIGINAL_ROW1_PROMPT


def test_twist_and_child_friendly_sentences(client: Any) -> None:
    twist = client.post(f"{PREFIX}/setstory/", json={**P, "twist": True}).get_json()[0]
    assert twist.endswith("a finale with a twist.")
    child = client.post(f"{PREFIX}/setstory/", json={**P, "childsafe": True}).get_json()[0]
    head, _, tail = child.partition("a development and a finale.")
    assert head and "child-friendly" in tail and tail.strip().endswith(".")


@pytest.mark.parametrize(
    ("sent", "word"),
    [
        ("Hystorical", "Historical"),
        ("Mistery", "Mystery"),
        ("Sci-Fy", "Science fiction"),
        ("Scy-fy", "Science fiction"),
        ("fantasy", "Fantasy"),
    ],
)
def test_misspelt_genres_are_accepted_and_corrected(client: Any, sent: str, word: str) -> None:
    resp = client.post(f"{PREFIX}/setstory/", json={**P, "genre": sent})
    assert resp.status_code == 200
    prompt = resp.get_json()[0]
    assert f"genre is {word} " in prompt
    assert sent not in prompt or sent == word


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"maxnowords": None}, ["body", "maxnowords"]),  # what the page sends for "abc"
        ({"maxnowords": 0}, ["body", "maxnowords"]),
        ({"maxnowords": 5001}, ["body", "maxnowords"]),
        ({"genre": "Western"}, ["body", "genre"]),
        ({"registro": "Shouty"}, ["body", "registro"]),
        ({"childsafe": "yes"}, ["body", "childsafe"]),
        ({"maincharacter": "   "}, ["body", "maincharacter"]),
    ],
)
def test_setstory_validation_is_422_with_the_field(
    client: Any, change: dict[str, Any], loc: list[str]
) -> None:
    resp = client.post(f"{PREFIX}/setstory/", json={**P, **change})
    assert resp.status_code == 422
    assert resp.get_json()["detail"][0]["loc"] == loc


def test_setstory_missing_field_and_wrong_method(client: Any) -> None:
    body = {k: v for k, v in P.items() if k != "registro"}
    resp = client.post(f"{PREFIX}/setstory/", json=body)
    assert resp.status_code == 422
    assert resp.get_json()["detail"][0]["loc"] == ["body", "registro"]
    assert resp.get_json()["detail"][0]["type"] == "missing"
    assert client.get(f"{PREFIX}/setstory/").status_code == 405
    assert (
        client.post(f"{PREFIX}/setstory/", data="not json", content_type="application/json").status_code
        == 400
    )


def test_max_words_setting_lowers_the_bound(make_app: Any, fake_openai: Any) -> None:
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, STORYTELLER_MAX_WORDS=300)
    client = app.test_client()
    resp = client.post(f"{PREFIX}/setstory/", json={**P, "maxnowords": 400})
    assert resp.status_code == 422
    assert resp.get_json()["detail"][0]["loc"] == ["body", "maxnowords"]
    assert client.post(f"{PREFIX}/setstory/", json={**P, "maxnowords": 300}).status_code == 200


def test_preflight_from_a_file_page(client: Any) -> None:
    resp = client.options(
        f"{PREFIX}/setstory/",
        headers={
            "Origin": "null",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert resp.status_code == 200
    assert resp.headers.get("Access-Control-Allow-Origin") in ("null", "*")


# --------------------------------------------------------------------------- generation, rewrite (replay 9)


def test_story_uses_system_role_token_cap_and_session_prompt(client: Any, fake_openai: Any) -> None:
    prompt = client.post(f"{PREFIX}/setstory/", json=P).get_json()[0]
    fake_openai.script("Once upon a time.")
    done = write(client)
    assert done["story"] == "Once upon a time." and done["kind"] == "generated" and done["n"] == 1
    request = fake_openai.last_chat()
    assert request["stream"] is True
    assert request["messages"][0]["role"] == "system" and "writer" in request["messages"][0]["content"]
    assert request["messages"][-1] == {"role": "user", "content": prompt}
    assert request["max_tokens"] == 192  # sized from the 100-word limit: +20% at about 1.6 tokens per word
    version = client.get(f"{PREFIX}/api/versions/{done['version']}").get_json()
    assert version["prompt"] == prompt and version["template"] == "storyteller/story"
    assert len(version["template_hash"]) == 12 and version["model"] == "fake-model"
    assert version["settings"]["maincharacter"] == "Paolo"


def test_redo_prompt_and_stream_keep_the_ends(client: Any, fake_openai: Any) -> None:
    prompt = client.post(f"{PREFIX}/setstory/", json=P).get_json()[0]
    fake_openai.script("Once upon a time.")
    write(client)
    resp = client.post(
        f"{PREFIX}/redopartstory/",
        json={"textbefore": "Once upon", "textselected": " a time", "textafter": "."},
    )
    assert resp.status_code == 200
    redo = resp.get_json()
    assert isinstance(redo, list) and len(redo) == 1
    assert redo[0].startswith(prompt) and "Once upon[...]." in redo[0]  # the gap marked in the story
    fake_openai.script("a starry night")
    done = write(client)
    assert done["kind"] == "rewrite"
    assert done["story"] == "Once upon a starry night."
    request = fake_openai.last_chat()
    assert request["messages"][-1]["content"] == redo[0]
    assert request["max_tokens"] <= 40  # the budget follows the 2-word selection, not the 100-word story
    # the rewrite was used once: "Regenerate the story" is the story prompt again
    fake_openai.script("A whole new story.")
    again = write(client)
    assert again["kind"] == "regenerated" and again["story"] == "A whole new story."
    assert fake_openai.last_chat()["messages"][-1]["content"] == prompt


STORY = (
    "Mia lived by the sea, where gulls argued “loudly” about fish.\n\n"
    "One stormy night, the lighthouse went dark — and Mia climbed the 132 steps. 🌊\n"
    "At the top she found Leo, asleep beside a dead lamp."
)


def test_partial_rewrite_keeps_the_surrounding_text_byte_identical(client: Any, fake_openai: Any) -> None:
    client.post(f"{PREFIX}/setstory/", json={**P, "maincharacter": "Mia, Leo", "maxnowords": 300})
    fake_openai.script(STORY)
    first = write(client)
    assert first["story"] == STORY
    selected = "One stormy night, the lighthouse went dark — and Mia climbed the 132 steps."
    start = STORY.index(selected)
    before, after = STORY[:start], STORY[start + len(selected) :]
    resp = client.post(
        f"{PREFIX}/api/rewrite",
        json={
            "version": first["version"],
            "textbefore": before,
            "textselected": selected,
            "textafter": after,
        },
    )
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["words"] == len(selected.split())
    # the model wraps its answer in quotes and spaces: only the replacement is kept
    fake_openai.script('  "When the storm hit, the lamp failed, so Mia ran up the tower."  \n')
    done = write(client)
    story = done["story"]
    assert story.encode().startswith(before.encode()) and story.encode().endswith(after.encode())
    middle = story[len(before) : len(story) - len(after)]
    assert middle == "When the storm hit, the lamp failed, so Mia ran up the tower."
    request = fake_openai.last_chat()
    user = request["messages"][-1]["content"]
    assert "Mia lived by the sea" in user and "asleep beside a dead lamp" in user  # context both sides
    assert "[...]" in user and selected in user  # the gap is marked; the old passage is quoted once
    version = client.get(f"{PREFIX}/api/versions/{done['version']}").get_json()
    assert version["kind"] == "rewrite" and version["parent"] == first["version"]
    assert version["rewrite"]["selected"] == selected and version["rewrite"]["start"] == len(before)
    assert version["prompt"] == first_prompt(client)  # the story prompt stays the one that made the story


def first_prompt(client: Any) -> str:
    return client.get(f"{PREFIX}/api/session").get_json()["prompt"]


def test_rewrite_by_offsets_and_mismatch_is_409(client: Any, fake_openai: Any) -> None:
    client.post(f"{PREFIX}/setstory/", json=P)
    fake_openai.script("Alpha beta gamma. Delta epsilon.")
    v1 = write(client)
    stale = client.post(
        f"{PREFIX}/api/rewrite",
        json={
            "version": v1["version"],
            "textbefore": "Alpha ",
            "textselected": "BETA",
            "textafter": " gamma. Delta epsilon.",
        },
    )
    assert stale.status_code == 409
    empty = client.post(f"{PREFIX}/api/rewrite", json={"start": 3, "end": 3})
    assert empty.status_code == 422
    ok = client.post(f"{PREFIX}/api/rewrite", json={"start": 6, "end": 10})
    assert ok.status_code == 200 and ok.get_json()["selected"] == "beta"
    fake_openai.script("zeta")
    assert write(client)["story"] == "Alpha zeta gamma. Delta epsilon."


def test_rewrite_before_any_story_is_409(client: Any) -> None:
    client.post(f"{PREFIX}/setstory/", json=P)
    assert client.post(f"{PREFIX}/api/rewrite", json={"start": 0, "end": 2}).status_code == 409


def test_redo_from_the_original_page_keeps_newlines_and_stores_unsaved_edits(
    client: Any, fake_openai: Any
) -> None:
    client.post(f"{PREFIX}/setstory/", json=P)
    fake_openai.script("Line one.\nLine two.\nLine three.")
    write(client)
    # the page removes newlines from the text around the selection
    client.post(
        f"{PREFIX}/redopartstory/",
        json={"textbefore": "Line one.", "textselected": "Line two.", "textafter": "Line three."},
    )
    fake_openai.script("A new line.")
    assert write(client)["story"] == "Line one.\nA new line.\nLine three."
    # text the user typed into the page's textarea (never saved) becomes an `edited` version first
    client.post(
        f"{PREFIX}/redopartstory/",
        json={"textbefore": "I typed this. ", "textselected": "Line", "textafter": " three."},
    )
    fake_openai.script("Row")
    assert write(client)["story"] == "I typed this. Row three."
    kinds = [v["kind"] for v in client.get(f"{PREFIX}/api/versions").get_json()["versions"]]
    assert kinds == ["generated", "rewrite", "edited", "rewrite"]


# --------------------------------------------------------------------------- edits, history, feedback (replay 10-11)


def test_edit_history_and_feedback_mark_the_exact_version(
    client: Any, fake_openai: Any, tmp_path: Path
) -> None:
    prompt = client.post(f"{PREFIX}/setstory/", json=P).get_json()[0]
    fake_openai.script("Paolo saw a light.")
    v1 = write(client)
    edit = client.post(
        f"{PREFIX}/api/edit", json={"text": "Paolo saw a green light.", "parent": v1["version"]}
    )
    assert edit.status_code == 201
    v2 = edit.get_json()
    assert (
        v2["kind"] == "edited" and v2["parent"] == v1["version"] and v2["n"] == 2 and v2["prompt"] == prompt
    )
    history = client.get(f"{PREFIX}/api/versions").get_json()
    assert [v["n"] for v in history["versions"]] == [1, 2] and history["current_version"] == v2["id"]
    resp = client.post(f"{PREFIX}/api/feedback", json={"version": v2["id"]})
    assert resp.status_code == 200 and resp.get_json()["version"] == v2["id"]
    client.post(f"{PREFIX}/api/feedback", json={"version": v2["id"]})  # liking twice stays one record
    db = client.application.extensions["services"].db
    records = list(db.storyteller_feedback.find())
    assert len(records) == 1
    assert records[0]["story"] == "Paolo saw a green light." and records[0]["prompt"] == prompt
    assert records[0]["version"] == v2["id"] and records[0]["template"] == "storyteller/story"
    listed = client.get(f"{PREFIX}/api/versions").get_json()["versions"]
    assert [v["feedback"] for v in listed] == [False, True]


def test_savestory_stores_the_prompt_actually_used_and_the_csv_round_trips(
    client: Any, fake_openai: Any, tmp_path: Path
) -> None:
    prompt = client.post(f"{PREFIX}/setstory/", json=P).get_json()[0]
    fake_openai.script("Paolo met the aliens.\nThe end.")
    write(client)
    # the page sends the textarea without newlines: that is still the version shown
    resp = client.post(f"{PREFIX}/savestory/", json={**P, "story": "Paolo met the aliens.The end."})
    assert resp.status_code == 200
    saved = resp.get_json()
    assert saved["saved"] is True and saved["n"] == 1
    tricky = 'Paolo said, "Hello, aliens." They answered, "Hello, Paolo"; the end.'
    other = client.post(f"{PREFIX}/savestory/", json={**P, "story": tricky, "twist": True})
    assert other.status_code == 200 and other.get_json()["n"] == 2  # an edited text becomes a version
    db = client.application.extensions["services"].db
    records = {r["story"]: r for r in db.storyteller_feedback.find()}
    assert set(records) == {"Paolo met the aliens.\nThe end.", tricky}
    assert all(r["prompt"] == prompt for r in records.values())  # not rebuilt from the (changed) form
    assert records[tricky]["form"]["twist"] is True

    runner = client.application.test_cli_runner()
    out_csv = tmp_path / "stories.csv"
    result = runner.invoke(args=["storyteller", "dataset", "--out", str(out_csv), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "2 stories" in result.output
    text = out_csv.read_text(encoding="utf-8")
    assert text.startswith('"Prompt","Story"')
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [set(r) for r in rows] == [{"Prompt", "Story"}] * 2
    assert {r["Story"] for r in rows} == set(records)
    assert all(r["Prompt"].endswith(prompt) and "writer" in r["Prompt"] for r in rows)

    out_jsonl = tmp_path / "stories.jsonl"
    result = runner.invoke(args=["storyteller", "dataset", "--out", str(out_jsonl)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out_jsonl.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert [m["role"] for m in line["messages"]] == ["system", "user", "assistant"]
        assert line["messages"][1]["content"] == prompt
    assert {line["messages"][2]["content"] for line in lines} == set(records)


def test_savestory_without_story_is_422(client: Any) -> None:
    resp = client.post(f"{PREFIX}/savestory/", json=P)
    assert resp.status_code == 422
    assert resp.get_json()["detail"][0]["loc"] == ["body", "story"]


def test_savestory_without_any_session_rebuilds_from_the_form(client: Any) -> None:
    resp = client.post(f"{PREFIX}/savestory/", json={**P, "story": "A story typed by hand."})
    assert resp.status_code == 200
    db = client.application.extensions["services"].db
    record = db.storyteller_feedback.find_one()
    assert record["story"] == "A story typed by hand." and "Paolo" in record["prompt"]


def test_feedback_before_any_story_is_409(client: Any) -> None:
    client.post(f"{PREFIX}/setstory/", json=P)
    assert client.post(f"{PREFIX}/api/feedback", json={}).status_code == 409


def test_dataset_is_empty_without_feedback(client: Any, tmp_path: Path) -> None:
    out = tmp_path / "empty.jsonl"
    result = client.application.test_cli_runner().invoke(args=["storyteller", "dataset", "--out", str(out)])
    assert result.exit_code == 0 and "0 stories" in result.output
    assert out.read_text() == ""


# --------------------------------------------------------------------------- sessions, model switch, auth


def test_two_clients_keep_their_own_prompts(openai_app: Any, fake_openai: Any) -> None:
    a, b = openai_app.test_client(), openai_app.test_client()
    pa = a.post(f"{PREFIX}/setstory/", json={**P, "maincharacter": "Alice"}).get_json()[0]
    pb = b.post(f"{PREFIX}/setstory/", json={**P, "maincharacter": "Bruno"}).get_json()[0]
    assert a.get(f"{PREFIX}/api/session").get_json()["prompt"] == pa
    assert b.get(f"{PREFIX}/api/session").get_json()["prompt"] == pb
    fake_openai.script("A.", "B.")
    write(a)
    assert "Alice" in fake_openai.last_chat()["messages"][-1]["content"]
    write(b)
    assert "Bruno" in fake_openai.last_chat()["messages"][-1]["content"]


def test_explicit_session_field_and_query(client: Any, fake_openai: Any) -> None:
    client.post(f"{PREFIX}/setstory/", json={**P, "maincharacter": "Cookie"})  # the cookie's session
    sid = "tab-one-session-0001"
    resp = client.post(f"{PREFIX}/api/settings", json={**P, "session": sid, "maincharacter": "Zoe"})
    assert resp.status_code == 200 and resp.get_json()["session"] == sid
    client.set_cookie("storyteller_session", "not-this-one-0000", path="/")
    fake_openai.script("Zoe's tale.")
    done = write(client, session=sid)
    assert "Zoe" in fake_openai.last_chat()["messages"][-1]["content"]
    assert (
        client.get(f"{PREFIX}/api/versions?session={sid}").get_json()["versions"][0]["id"] == done["version"]
    )
    assert client.post(f"{PREFIX}/api/settings", json={**P, "session": "bad id!"}).status_code == 422


def test_storyteller_model_setting_switches_the_model(make_app: Any, fake_openai: Any) -> None:
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, STORYTELLER_MODEL="storyteller-ft")
    client = app.test_client()
    client.post(f"{PREFIX}/setstory/", json=P)
    fake_openai.script("Fine-tuned words.")
    done = write(client)
    assert fake_openai.last_chat()["model"] == "storyteller-ft"
    assert done["model"] == "storyteller-ft"
    assert client.get(f"{PREFIX}/api/versions/{done['version']}").get_json()["model"] == "storyteller-ft"


def test_model_failure_over_sse_is_an_error_event(make_app: Any, fake_openai: Any) -> None:
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, LLM_MAX_RETRIES=1)
    client = app.test_client()
    client.post(f"{PREFIX}/setstory/", json=P)
    fake_openai.fail_next(500, times=5)
    events = sse_events(client.get(f"{PREFIX}/stream"))
    assert events[-1]["type"] == "error" and "language model" in events[-1]["message"]
    assert client.get(f"{PREFIX}/api/versions").get_json()["versions"] == []


def test_sessions_are_private_with_auth(make_app: Any, fake_openai: Any) -> None:
    from apps.core.auth import create_user

    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, AUTH_MODE="apikey")
    db = app.extensions["services"].db
    key_a, key_b = create_user(db, "ann"), create_user(db, "ben")
    client = app.test_client()
    assert client.post(f"{PREFIX}/setstory/", json=P).status_code == 401
    sid = "ann-session-000001"
    resp = client.post(f"{PREFIX}/api/settings", json={**P, "session": sid}, headers={"X-API-Key": key_a})
    assert resp.status_code == 200
    other = app.test_client()
    assert other.get(f"{PREFIX}/api/session?session={sid}", headers={"X-API-Key": key_b}).status_code == 404
    assert other.get(f"{PREFIX}/api/session?session={sid}", headers={"X-API-Key": key_a}).status_code == 200


def test_page_and_assets_are_served_without_cdn(client: Any) -> None:
    page = client.get(f"{PREFIX}/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    for needle in (
        'href="assets/storyteller.css"',
        'src="assets/storyteller.js"',
        '<label for="characters"',
        'value="Sci-Fi"',
        'role="alert"',
        'id="history"',
    ):
        assert needle in html
    assert "http://" not in html and "https://" not in html
    js = client.get(f"{PREFIX}/assets/storyteller.js")
    assert js.status_code == 200 and "WebSocket" in js.get_data(as_text=True)
    assert client.get(f"{PREFIX}/assets/storyteller.css").status_code == 200


def test_root_app_mounts_the_page_and_the_original_paths_at_slash(make_app: Any, fake_openai: Any) -> None:
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, ROOT_APP="storyteller")
    client = app.test_client()
    assert client.post("/setstory/", json=P).status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'src="assets/storyteller.js"' in page.get_data(as_text=True)
    assert client.get("/assets/storyteller.js").status_code == 200
    assert any(rule.rule == "/ws" and rule.websocket for rule in app.url_map.iter_rules())
