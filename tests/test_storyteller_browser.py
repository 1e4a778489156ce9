"""The storyteller page in headless Chromium (Debian's `chromium`, driven by Playwright for Python):
fill the form, write a streamed story, select a sentence and rewrite it, mark the story good, and
check the feedback is stored; screenshots go to tests/artifacts/."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ARTIFACTS, ROOT
from tests.test_storyteller_support import live_server

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STORY = (
    "Mia kept the lighthouse on the rock. One night the storm put out the great lamp. "
    "Leo rowed out with a lantern, and together they lit it again."
)
SENTENCE = "One night the storm put out the great lamp."
NEW_SENTENCE = "At midnight a wave smashed the glass and the lamp went dark."


def _chromium() -> str | None:
    """/usr/bin/chromium, installed by scripts/install-browser.sh when missing (it needs root)."""
    path = shutil.which("chromium")
    if path is None:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "install-browser.sh")],
            capture_output=True,
            timeout=900,
            check=False,
        )
        path = shutil.which("chromium")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is not installed: scripts/test installs the test extra")
    executable = _chromium()
    if executable is None:
        pytest.fail("Debian's chromium is not installed and scripts/install-browser.sh could not install it")
    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield instance
        instance.close()


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_write_rewrite_and_like_a_story_in_the_page(browser: Any, openai_app: Any, fake_openai: Any) -> None:
    from playwright.sync_api import expect

    fake_openai.stream_delay = 0.03
    fake_openai.script(STORY, NEW_SENTENCE)
    db = openai_app.extensions["services"].db
    with live_server(openai_app) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/storyteller/")
            expect(page.locator("#write")).to_be_disabled()

            page.get_by_label("Main characters' names").fill("Mia, Leo")
            page.get_by_label("Story keywords").fill("lighthouse, storm")
            page.get_by_label("Genre").select_option("Mystery")
            page.get_by_label("Register").select_option("Vivid")
            page.get_by_label("Max number of words").fill("150")
            page.get_by_label("Child-friendly content").check()
            page.get_by_label("Story keywords").press("Enter")  # the keyboard submits the form
            expect(page.locator("#status")).to_contain_text("Settings saved")
            expect(page.locator("#prompt")).to_contain_text("Mia, Leo")

            page.locator("#write").focus()
            page.keyboard.press("Enter")
            expect(page.locator("#write")).to_be_disabled()  # no second stream while one runs
            expect(page.locator("#progress")).to_be_visible()
            expect(page.locator("#status")).to_contain_text("Done: version 1", timeout=15000)
            assert page.locator("#story").input_value() == STORY
            expect(page.locator("#write")).to_have_text("Regenerate the story")

            start = STORY.index(SENTENCE)
            page.evaluate(
                "([s, e]) => { const t = document.getElementById('story'); t.focus(); "
                "t.setSelectionRange(s, e); t.dispatchEvent(new Event('select')); }",
                [start, start + len(SENTENCE)],
            )
            expect(page.locator("#rewrite")).to_be_enabled()
            page.locator("#rewrite").click()
            expect(page.locator("#status")).to_contain_text("Done: version 2", timeout=15000)
            rewritten = page.locator("#story").input_value()
            assert rewritten == STORY[:start] + NEW_SENTENCE + STORY[start + len(SENTENCE) :]

            page.locator("#good").click()
            expect(page.locator("#status")).to_contain_text("Story added to the next fine-tuning")
            expect(page.locator("#good")).to_have_attribute("aria-pressed", "true")
            expect(page.locator("#history li")).to_have_count(2)
            expect(page.locator("#history li").last).to_contain_text("liked")
            path = shot(page, "storyteller.png")
            assert path.stat().st_size > 10_000

            records = list(db.storyteller_feedback.find())
            assert len(records) == 1
            assert records[0]["story"] == rewritten and records[0]["kind"] == "rewrite"
            assert "Mia, Leo" in records[0]["prompt"] and "Mystery" in records[0]["prompt"]
            assert "child-friendly" in records[0]["prompt"]
            chat_users = [r["json"]["messages"][-1]["content"] for r in fake_openai.chat_requests()]
            assert SENTENCE in chat_users[-1] and chat_users[-1].startswith(records[0]["prompt"])

            # a model failure is shown, and the story stays as it was
            fake_openai.fail_next(500, times=10)
            page.locator("#write").click()
            expect(page.locator("#error")).to_be_visible(timeout=15000)
            expect(page.locator("#error")).to_contain_text("language model")
            assert page.locator("#story").input_value() == rewritten
            expect(page.locator("#write")).to_be_enabled()
            shot(page, "storyteller-error.png")
            assert errors == []
        finally:
            page.close()
