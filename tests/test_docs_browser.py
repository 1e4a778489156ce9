"""`/docs` in headless Chromium with AUTH_MODE=apikey: "Authorize" with a key, then "Try it out" on
protected operations (a GET and a POST with its documented example) gets 200 (issue 17 item 7)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from apps.core.auth import create_user
from tests.test_storyteller_browser import browser, shot  # noqa: F401 - the module-scoped fixture
from tests.test_storyteller_support import live_server

pytestmark = pytest.mark.browser


def _try_it_out(page: Any, opblock: str) -> Any:
    from playwright.sync_api import expect

    block = page.locator(f"#{opblock}")
    block.locator(".opblock-summary").click()
    block.locator("button.try-out__btn").click()
    block.locator("button.execute").click()
    status = block.locator(".live-responses-table tbody .response-col_status").first
    expect(status).to_be_visible(timeout=15000)
    return block, status


def test_authorize_and_try_it_out(browser: Any, make_app: Any, fake_openai: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    app = make_app(
        LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k", AUTH_MODE="apikey"
    )
    db = app.extensions["services"].db
    key = create_user(db, "alice")
    with live_server(app) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(base + "/docs")  # redirects to the Swagger UI
            expect(page.locator("button.authorize").first).to_be_visible(timeout=15000)

            # without authorizing, the protected call is refused
            block, status = _try_it_out(page, "operations-auth-auth_me_me_get")
            expect(status).to_have_text("401")

            page.locator("button.authorize").first.click()
            scheme = page.locator(".auth-container").filter(has_text="X-API-Key")
            scheme.locator("input").fill(key)
            scheme.locator("button.authorize").click()
            page.locator(".modal-ux button.btn-done, .modal-ux button.close-modal").first.click()

            block.locator("button.execute").click()
            expect(status).to_have_text("200", timeout=15000)
            body = block.locator(
                ".live-responses-table tbody .response-col_description pre"
            ).first.inner_text()
            assert json.loads(body)["user"] == "alice"

            # a POST whose body Swagger fills in from the documented example
            block, status = _try_it_out(page, "operations-ideation-ideation_paint_start_paint_start_post")
            expect(status).to_have_text("200", timeout=15000)
            shot(page, "docs-try-it-out.png")
        finally:
            page.close()
    state = db.ideation_users.find_one({"username": "alice"})  # the caller, not the example's "10"
    assert state is not None
