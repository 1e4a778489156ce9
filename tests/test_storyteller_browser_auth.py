"""The storyteller page with AUTH_MODE=apikey in headless Chromium: sign in with a key made by
`flask users create`, write a streamed story over the WebSocket (a session-scoped `?token=`), and
again over SSE (EventSource) with WebSocket disabled (issue 17 item 4)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.conftest import ARTIFACTS
from tests.test_storyteller_browser import browser, shot  # noqa: F401 - the module-scoped fixture
from tests.test_storyteller_support import live_server

pytestmark = pytest.mark.browser

STORY = "Mia kept the lighthouse on the rock. One night the storm put out the lamp, and Leo lit it again."


def _cli_key(app: Any, name: str) -> str:
    """A key from the real CLI (`flask users create NAME`), as an operator makes one."""
    result = app.test_cli_runner().invoke(args=["users", "create", name])
    assert result.exit_code == 0, result.output
    match = re.search(r"API key \(shown once\): (\S+)", result.output)
    assert match, result.output
    return match.group(1)


def _fill_and_submit(page: Any) -> None:
    from playwright.sync_api import expect

    page.get_by_label("Main characters' names").fill("Mia, Leo")
    page.get_by_label("Story keywords").fill("lighthouse, storm")
    page.get_by_label("Max number of words").fill("120")
    page.locator("#submit").click()
    expect(page.locator("#status")).to_contain_text("Settings saved")


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_sign_in_and_stream_a_story_with_auth_on(
    browser: Any,  # noqa: F811
    make_app: Any,
    fake_openai: Any,
    transport: str,
) -> None:
    from playwright.sync_api import expect

    app = make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        LLM_MODEL="fake-model",
        AUTH_MODE="apikey",
    )
    key = _cli_key(app, "alice")
    fake_openai.stream_delay = 0.05
    fake_openai.script(STORY)
    db = app.extensions["services"].db
    with live_server(app) as base:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        if transport == "sse":  # the page falls back to EventSource where WebSocket is missing
            context.add_init_script("delete window.WebSocket;")
        page = context.new_page()
        seen_deltas: list[str] = []
        try:
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/storyteller/")
            expect(page.locator("#signin")).to_be_visible()
            expect(page.locator("#who")).to_contain_text("API key")

            page.get_by_label("API key").fill("csk_wrong")
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("#who")).to_contain_text("refused")

            page.get_by_label("API key").fill(key)
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("#who")).to_contain_text("Signed in as alice")
            assert page.evaluate("sessionStorage.getItem('storyteller.apikey')") == key

            _fill_and_submit(page)
            page.locator("#write").click()
            # text appears while it streams, before the end
            expect(page.locator("#status")).to_contain_text("Writing…", timeout=15000)
            seen_deltas.append(page.locator("#story").input_value())
            expect(page.locator("#status")).to_contain_text("Done: version 1", timeout=20000)
            assert page.locator("#story").input_value() == STORY
            assert seen_deltas[0] and seen_deltas[0] != STORY and STORY.startswith(seen_deltas[0])
            shot(page, f"storyteller-auth-{transport}.png")
            assert errors == []
        finally:
            context.close()
    session = db.storyteller_sessions.find_one({"user": "alice"})
    assert session is not None
    versions = list(db.storyteller_versions.find({"session": session["_id"]}))
    assert [v["text"] for v in versions] == [STORY]
    assert ARTIFACTS.exists()
