"""The issue's "done when", on the embedded default model (LLM_PROVIDER=local, SmolLM2-135M), over real
HTTP and WebSocket: open the page, write a story, rewrite a selected sentence, mark it good, and
`flask storyteller dataset` contains it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import requests

from tests.test_storyteller_support import live_server, ws_read, ws_url

PREFIX = "/storyteller"


def test_newcomer_flow_on_the_embedded_model(make_app: Any, tmp_path: Path) -> None:
    app = make_app(LLM_PROVIDER="local", LOCAL_LLM_MODE="inprocess")
    with live_server(app) as base:
        http = requests.Session()
        page = http.get(base + f"{PREFIX}/", timeout=30)
        assert page.status_code == 200 and "Write a new story" in page.text
        sid = "newcomer-session-01"
        settings = {
            "session": sid,
            "maincharacter": "Mia",
            "keywords": "lighthouse, storm",
            "genre": "Adventure",
            "registro": "Playful",
            "childsafe": True,
            "maxnowords": 40,
            "twist": False,
        }
        resp = http.post(base + f"{PREFIX}/api/settings", json=settings, timeout=30)
        assert resp.status_code == 200 and "Mia" in resp.json()["prompt"]

        got = ws_read(ws_url(base, session=sid, format="json"), timeout=120)
        assert got.code == 1000, got.reason
        done = got.json()[-1]
        assert done["type"] == "done" and done["kind"] == "generated"
        story = done["story"]
        assert len(story.split()) >= 5  # real text from the embedded model
        assert len(story.split()) <= 2 * 40 + 10  # the token cap (~2 per word) bounds it

        # select one sentence (the first that has a few words), rewrite only it
        sentences = [m for m in re.finditer(r"[^.!?\n]+[.!?]", story) if len(m.group().split()) >= 3]
        match = sentences[0] if sentences else re.search(r"\S+(\s+\S+){0,4}", story)
        assert match is not None
        start, end = match.start(), match.end()
        before, after = story[:start], story[end:]
        resp = http.post(
            base + f"{PREFIX}/api/rewrite",
            json={
                "session": sid,
                "version": done["version"],
                "textbefore": before,
                "textselected": story[start:end],
                "textafter": after,
            },
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        got = ws_read(ws_url(base, session=sid, format="json"), timeout=120)
        assert got.code == 1000, got.reason
        rewritten = got.json()[-1]
        assert rewritten["type"] == "done" and rewritten["kind"] == "rewrite"
        new_story = rewritten["story"]
        assert new_story.startswith(before) and new_story.endswith(after)  # byte-identical ends
        assert new_story[len(before) : len(new_story) - len(after)].strip()

        resp = http.post(
            base + f"{PREFIX}/api/feedback",
            json={"session": sid, "version": rewritten["version"]},
            timeout=30,
        )
        assert resp.status_code == 200 and resp.json()["saved"] is True

    out = tmp_path / "stories.jsonl"
    result = app.test_cli_runner().invoke(args=["storyteller", "dataset", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1
    messages = records[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[2]["content"] == new_story and "Mia" in messages[1]["content"]
