"""`/dashboard/` in headless Chromium (Debian's `chromium`, driven by Playwright for Python): with
STUDY=example and two participants who each made a book, the page shows both, their conditions,
their pictures (really loaded), a failure with its error and the two server-drawn plots; a
screenshot goes to tests/artifacts/dashboard.png."""

from __future__ import annotations

from typing import Any

import pytest

from agent.llm import CallContext
from tests.test_storybook import openai_settings
from tests.test_storyteller_browser import browser, shot  # noqa: F401 - the module-scoped fixture
from tests.test_storyteller_support import live_server
from tests.test_studies import make_book, story_fake  # noqa: F401 - fixture

pytestmark = pytest.mark.browser


def test_dashboard_shows_participants_conditions_and_images(
    browser: Any,  # noqa: F811
    make_app: Any,
    story_fake: Any,  # noqa: F811
) -> None:
    from playwright.sync_api import expect

    app = make_app(**openai_settings(story_fake), STUDY="example")
    make_book(app, "alice", pages=2)
    make_book(app, "bob", pages=2)
    story_fake.fail_next(400, times=1)
    with pytest.raises(Exception, match="400"):
        app.extensions["services"].llm.chat(
            [{"role": "user", "content": "x"}], context=CallContext(app="storybook", user="bob", step="title")
        )
    with live_server(app) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            requests: list[str] = []
            page.on("request", lambda req: requests.append(req.url))
            page.goto(base + "/dashboard/")
            expect(page.locator("h1")).to_have_text("Study dashboard")
            expect(page.locator("#study")).to_contain_text("pilot, warm vs neutral tone")
            rows = page.locator("#participants tbody tr")
            expect(rows).to_have_count(2)
            expect(rows.nth(0)).to_contain_text("alice")
            expect(rows.nth(0)).to_contain_text("neutral")
            expect(rows.nth(1)).to_contain_text("bob")
            expect(rows.nth(1)).to_contain_text("warm")
            expect(rows.nth(1)).to_contain_text("storybook")

            for who, cond in (("alice", "neutral"), ("bob", "warm")):
                section = page.locator(f'section.participant[data-participant="{who}"]')
                expect(section.locator("h3")).to_contain_text(cond)
                images = section.locator("img")
                expect(images).to_have_count(3)  # the cover + two pages
                for i in range(3):
                    img = images.nth(i)
                    img.scroll_into_view_if_needed()
                    page.wait_for_function(
                        "(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle()
                    )
            bob_gallery = page.locator('section.participant[data-participant="bob"]')
            expect(bob_gallery).to_contain_text("storybook/plan.warm")
            expect(page.locator("#failures tbody tr")).to_have_count(1)
            expect(page.locator("#failures")).to_contain_text("400")
            expect(page.locator("#plots svg")).to_have_count(2)
            expect(page.locator("#plots svg").first).to_contain_text("openai / plan")
            expect(page.locator("#plots svg").nth(1)).to_contain_text("warm")

            path = shot(page, "dashboard.png")
            assert path.stat().st_size > 20_000

            page.locator('select[name="app"]').select_option("ideation")
            page.locator('button[type="submit"]').click()
            expect(page.locator("#participants")).to_contain_text("no participants yet")
            page.go_back()
            expect(page.locator("#participants tbody tr")).to_have_count(2)
            assert errors == []
            assert all(url.startswith(base) for url in requests), "no CDN or other host"
        finally:
            page.close()
