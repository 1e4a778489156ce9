"""Contracts the real frontends depend on across apps (issue 17, issue 15 item 3).

CORS is checked the way a browser applies it: a small model of the HTTP cache (keyed by URL plus
the request headers a response `Vary`s on) decides whether a later `fetch()` is answered from an
earlier Origin-less `<img>` load, and the response that is used must then pass the CORS check.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import requests
from PIL import Image

EVIL = "https://evil.example"
OK = "https://ok.example"


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def cors_allows(headers: Any, origin: str, *, credentials: bool = False) -> bool:
    """The browser's CORS check of a response to a request from `origin` (Fetch standard, simplified)."""
    allow = headers.get("Access-Control-Allow-Origin")
    if credentials:
        return allow == origin and headers.get("Access-Control-Allow-Credentials") == "true"
    return allow == "*" or allow == origin


class BrowserCache:
    """A private HTTP cache: reuses a stored response only if every `Vary` header matches the new request."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[dict[str, str], Any]] = {}

    def get(self, fetch: Any, url: str, headers: dict[str, str]) -> tuple[Any, bool]:
        """(response headers, served from cache?) for a GET of `url` with `headers`."""
        stored = self.entries.get(url)
        if stored is not None:
            sent, resp_headers = stored
            vary = [v.strip().lower() for v in (resp_headers.get("Vary") or "").split(",") if v.strip()]
            if "*" not in vary and all(_header(sent, v) == _header(headers, v) for v in vary):
                return resp_headers, True
        resp_headers = fetch(url, headers)
        if "max-age" in (resp_headers.get("Cache-Control") or ""):
            self.entries[url] = (dict(headers), resp_headers)
        return resp_headers, False


def _header(headers: dict[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name), None)


# ------------------------------------------------------------------ CORS settings


def test_default_cors_never_hands_credentials_to_any_origin(client: Any) -> None:
    for method, path in (("GET", "/health"), ("GET", "/auth/me"), ("OPTIONS", "/ideation/generate")):
        headers = {"Origin": EVIL}
        if method == "OPTIONS":
            headers.update(
                {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
            )
        resp = client.open(path, method=method, headers=headers)
        assert resp.headers.get("Access-Control-Allow-Credentials") != "true", path
        assert resp.headers.get("Access-Control-Allow-Origin") == "*", path
        assert EVIL not in str(resp.headers), path


def test_listed_origin_gets_credentials_others_nothing(make_app: Any, fake_openai: Any) -> None:
    app = make_app(CORS_ORIGINS=OK, LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url)
    c = app.test_client()
    ok = c.get("/health", headers={"Origin": OK})
    assert ok.headers["Access-Control-Allow-Origin"] == OK
    assert ok.headers["Access-Control-Allow-Credentials"] == "true"
    assert cors_allows(ok.headers, OK, credentials=True)
    evil = c.get("/health", headers={"Origin": EVIL})
    assert "Access-Control-Allow-Origin" not in evil.headers
    assert not cors_allows(evil.headers, EVIL)


# ------------------------------------------------------------------ images after an Origin-less load


def _image_url(app: Any, user: str | None = None) -> str:
    image_id = app.extensions["services"].images.save(png_bytes(), app="ideation", user=user, kind="upload")
    return f"/images/{image_id}.png"


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the defaults: auth off, CORS_ORIGINS=*
        {"CORS_ORIGINS": "http://localhost:3000"},  # a listed origin, auth off
        {"CORS_ORIGINS": "http://localhost:3000", "AUTH_MODE": "apikey", "IMAGE_ACCESS": "link"},
    ],
)
def test_image_fetched_after_img_load_passes_cors(
    make_app: Any, fake_openai: Any, settings: dict[str, str]
) -> None:
    """StepIdeator's 放至工作区: `<img src>` (no Origin) first, then `fetch()` of the same URL."""
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, **settings)
    c = app.test_client()
    url = _image_url(app)
    origin = "http://localhost:3000"

    def fetch(u: str, headers: dict[str, str]) -> Any:
        resp = c.get(u, headers=headers)
        assert resp.status_code == 200
        return resp.headers

    cache = BrowserCache()
    first, _ = cache.get(fetch, url, {})
    assert "origin" in first["Vary"].lower()
    second, from_cache = cache.get(fetch, url, {"Origin": origin})
    assert "origin" in second["Vary"].lower()
    assert cors_allows(second, origin), (from_cache, dict(second))
    # a third load from the same origin may come from the cache, and still passes
    third, _ = cache.get(fetch, url, {"Origin": origin})
    assert cors_allows(third, origin)


def test_private_image_with_auth_on_still_varies_on_origin(make_app: Any, fake_openai: Any) -> None:
    """IMAGE_ACCESS=owner with auth on: no `*` for it, but `Vary: Origin` so a cached copy is never misused."""
    from apps.core.auth import create_user

    app = make_app(
        LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, AUTH_MODE="apikey", CORS_ORIGINS=OK
    )
    key = create_user(app.extensions["services"].db, "alice")
    url = _image_url(app, user="alice")
    c = app.test_client()
    plain = c.get(url, headers={"X-API-Key": key})
    assert plain.status_code == 200 and "origin" in plain.headers["Vary"].lower()
    assert "Access-Control-Allow-Origin" not in plain.headers
    listed = c.get(url, headers={"X-API-Key": key, "Origin": OK})
    assert cors_allows(listed.headers, OK, credentials=True)
    assert (
        c.get(url, headers={"X-API-Key": key, "Origin": EVIL}).headers.get("Access-Control-Allow-Origin")
        is None
    )


def test_cors_headers_from_real_gunicorn(gunicorn_server: Any, fake_openai: Any) -> None:
    """The same rules through gunicorn (its own header handling, a real socket)."""
    base = gunicorn_server(
        workers=1,
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        IMAGE_PROVIDER="placeholder",
        RATE_LIMIT_ENABLED="false",
    )
    health = requests.get(base + "/ping", headers={"Origin": EVIL}, timeout=30)
    assert health.headers.get("Access-Control-Allow-Origin") == "*"
    assert "Access-Control-Allow-Credentials" not in health.headers
    pre = requests.options(
        base + "/ideation/uploadImage",
        timeout=30,
        headers={
            "Origin": EVIL,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert pre.status_code == 200 and pre.headers.get("Access-Control-Allow-Origin") == "*"
    assert "Access-Control-Allow-Credentials" not in pre.headers
    up = requests.post(
        base + "/ideation/uploadImage", files={"file": ("photo.png", png_bytes(), "image/png")}, timeout=30
    )
    assert up.status_code == 200, up.text
    path = "/images/" + up.json()["url"].rsplit("/images/", 1)[1]

    def fetch(u: str, headers: dict[str, str]) -> Any:
        resp = requests.get(base + u, headers=headers, timeout=30)
        assert resp.status_code == 200
        return resp.headers

    cache = BrowserCache()
    first, _ = cache.get(fetch, path, {})
    second, _ = cache.get(fetch, path, {"Origin": "http://127.0.0.1:3000"})
    assert "origin" in first["Vary"].lower() and "origin" in second["Vary"].lower()
    assert cors_allows(second, "http://127.0.0.1:3000")
