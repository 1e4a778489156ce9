"""docs/frontends.md's table, tested: each row's settings are applied as written and that frontend's
key requests (research/*.md replays) are sent the way it sends them (issue 17 item 5)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from tests.conftest import ROOT
from tests.test_contracts import BrowserCache, cors_allows
from tests.test_storybook import check_snapshot_rules, parse_sse, story_responder
from tests.test_storyteller_support import live_server, ws_read, ws_url

TABLE = ROOT / "docs" / "frontends.md"
NOT_APP_SETTINGS = {"PORT"}  # where the server listens: the tests use a free port or the test client


def table_rows(path: Path = TABLE) -> dict[str, dict[str, str]]:
    """Frontend name (first cell, before the parenthesis) -> the Settings cell as a dict."""
    rows: dict[str, dict[str, str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or cells[0] in ("Frontend (app)", "---"):
            continue
        settings = re.findall(r"([A-Z_]+)=(\S+?)(?=\s|`)", cells[6])
        rows[cells[0].split(" (")[0]] = dict(settings)
    return rows


ROWS = table_rows()


def settings_of(frontend: str, fake: Any, **extra: Any) -> dict[str, Any]:
    row = {k: v for k, v in ROWS[frontend].items() if k not in NOT_APP_SETTINGS}
    return {
        "LLM_PROVIDER": "openai",
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": "k",
        "LLM_MODEL": "fake-model",
        "IMAGE_PROVIDER": "placeholder",
        "RATE_LIMIT_ENABLED": False,
        **row,
        **extra,
    }


def png_file(name: str = "photo.png") -> tuple[io.BytesIO, str, str]:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 90, 160)).save(buf, format="PNG")
    buf.seek(0)
    return buf, name, "image/png"


def test_the_table_has_a_row_per_frontend() -> None:
    assert set(ROWS) >= {
        "tangled-mare",
        "StepIdeator",
        "InsPilot / Refinity",
        "StorAIteller's original page",
        "this server's storyteller page",
    }
    assert ROWS["tangled-mare"]["IMAGE_ACCESS"] == "link" and ROWS["tangled-mare"]["AUTH_MODE"] == "basic"


def test_tangled_mare(make_app: Any, fake_openai: Any) -> None:
    """Replays 1, 2, 4, 9, 10 of research/storybook-rotate-calvary.md §8, plus its `<img>` loads."""
    fake_openai.set_responder(story_responder(fake_openai))
    row = ROWS["tangled-mare"]
    origin = row["CORS_ORIGINS"]
    app = make_app(**settings_of("tangled-mare", fake_openai))
    c = app.test_client()
    auth = {
        "Authorization": "Basic "
        + base64.b64encode(f"{row['BASIC_AUTH_USERNAME']}:{row['BASIC_AUTH_PASSWORD']}".encode()).decode()
    }
    assert c.get("/").get_json() == {"status": "healthy"}
    pre = c.options(
        "/get_storybook/",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert pre.status_code == 200 and cors_allows(pre.headers, origin, credentials=True)
    denied = c.get("/get_storybook/?des=x&pgs=2")
    assert denied.status_code == 401 and denied.get_json() == {"detail": "Not authenticated"}
    des = "Set%20in%20the%20cowboy%20bebop%20universe%2C%20Benny%20goes%20to%20Mars"
    task = c.get(f"/get_storybook/?des={des}&pgs=2", headers={**auth, "Origin": origin})
    assert task.status_code == 200 and cors_allows(task.headers, origin, credentials=True)
    task_id = task.get_json()["task_id"]
    stream = c.get(f"/get_updates/{task_id}", headers={"Origin": origin})  # EventSource: no credentials
    snaps = check_snapshot_rules(parse_sse([stream.get_data(as_text=True)]), pages=2)
    final = snaps[-1]["data"]
    assert snaps[-1]["status"] == "done" and len(final["illustrations"]) == 2
    for url in final["illustrations"]:  # <img src>: no credentials, no Origin; IMAGE_ACCESS=link serves it
        img = c.get(url[url.index("/images/") :])
        assert img.status_code == 200 and img.data.startswith(b"\x89PNG")
    # the same book's picture under IMAGE_ACCESS=owner would be refused to the <img> (the grey placeholders)
    strict = make_app(**settings_of("tangled-mare", fake_openai, IMAGE_ACCESS="owner"))
    url = final["illustrations"][0]
    assert strict.test_client().get(url[url.index("/images/") :]).status_code == 401


def test_stepideator(make_app: Any, fake_openai: Any) -> None:
    """Replays 1, 16, 17 of research/ideation-stepideator.md §8, and 放至工作区 (fetch after <img>)."""
    app = make_app(**settings_of("StepIdeator", fake_openai))
    c = app.test_client()
    origin = "http://localhost:3000"
    brief = {
        "username": "10",
        "designTask": "设计一款适用于丘陵果园的农业植保无人机",
        "currentNum": 2,
        "currentAIStage": "设计摘要的辅助生成",
        "currentStage": "设计摘要的环境",
        "selectedTexts": [],
        "selectedCanvasRecords": [],
        "selectedButtonInfo": {"buttonText": "生成全新摘要", "aiStage": "设计摘要的辅助生成"},
    }
    reply = c.post("/generate", json=brief, headers={"Origin": origin}).get_json()
    assert reply["success"] is True and reply["code"] == 0, reply
    up = c.post(
        "/uploadImage",
        data={"file": png_file()},
        content_type="multipart/form-data",
        headers={"Origin": origin},
    )
    assert up.status_code == 200 and up.get_json()["success"] is True
    path = "/images/" + up.get_json()["url"].rsplit("/images/", 1)[1]

    def fetch(u: str, headers: dict[str, str]) -> Any:
        resp = c.get(u, headers=headers)
        assert resp.status_code == 200 and resp.mimetype == "image/png"
        return resp.headers

    cache = BrowserCache()
    cache.get(fetch, path, {})  # the feed's <img>
    headers, _ = cache.get(fetch, path, {"Origin": origin})  # fetch() when the image goes to the workspace
    assert cors_allows(headers, origin)
    image_id = path.rsplit("/", 1)[1][:-4]
    assert (
        app.extensions["services"].db["images.files"].find_one({"_id": image_id})["metadata"]["user"] == "10"
    )
    timings = {
        "username": "10",
        "stageSwitchRecords": {"设计摘要的环境": [{"startTime": 1710396426000, "duration": 95000}]},
        "aiStageSwitchRecords": {"设计摘要的辅助生成": [{"startTime": 1710396486000}]},
    }
    assert c.post("/timeRecord", json=timings).get_json()["success"] is True


def test_inspilot(make_app: Any, fake_openai: Any) -> None:
    """Replays R0, R1, R5 of research/refinement-inspilot.md §8."""
    app = make_app(**settings_of("InsPilot / Refinity", fake_openai))
    c = app.test_client()
    origin = "http://localhost:3000"
    assert c.get("/ping").data == b"pong"
    pre = c.options(
        "/generate",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert pre.status_code == 200 and cors_allows(pre.headers, origin)
    start = c.post("/paint/start", json={"username": "p01"}).get_json()
    assert start["success"] is True and start["data"]["username"] == "p01"
    png = (
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
        "AAAABJRU5ErkJggg=="
    )
    fake_openai.script({"names": ["折叠跳绳", "计数手环"]}, {"selected": [1]})
    names = c.post(
        "/generate",
        json={
            "appid": 0,
            "type": 2,
            "prompts": {
                "designTask": "设计一款运动辅助产品",
                "selectNum": 1,
                "schemes": [
                    {"designTexts": ["可折叠"], "designImage": png},
                    {"designTexts": ["计数"], "designImage": png},
                ],
            },
        },
        headers={"Origin": origin},
    ).get_json()
    assert names["success"] is True, names
    assert names["data"]["names"] == ["折叠跳绳", "计数手环"] and len(names["data"]["stimulusIds"]) == 1


def test_storaiteller_original_page(make_app: Any, fake_openai: Any) -> None:
    """Replays 1, 7, 8 of research/storyteller-storaiteller.md §10 (the page opened from disk)."""
    app = make_app(**settings_of("StorAIteller's original page", fake_openai))
    payload = {
        "maincharacter": "Paolo",
        "keywords": "aliens",
        "genre": "Thriller",
        "registro": "Conversational",
        "childsafe": False,
        "maxnowords": 100,
        "twist": False,
    }
    with live_server(app) as base:
        c = app.test_client()
        pre = c.options(
            "/setstory/",
            headers={
                "Origin": "null",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert pre.status_code == 200 and cors_allows(pre.headers, "null")
        prompt = requests.post(base + "/setstory/", json=payload, headers={"Origin": "null"}, timeout=30)
        assert prompt.status_code == 200 and "Paolo" in prompt.json()[0]
        fake_openai.script("Once upon a time.")
        result = ws_read(ws_url(base, "/ws"))  # the page's socket: another host name, no cookie
        assert result.text == "Once upon a time." and result.code == 1000


def test_this_servers_storyteller_page(make_app: Any, fake_openai: Any) -> None:
    """The row's AUTH_MODE: the page is served with its sign-in form; a key opens the API and a stream."""
    from apps.core.auth import create_user

    app = make_app(**settings_of("this server's storyteller page", fake_openai))
    key = create_user(app.extensions["services"].db, "alice")
    c = app.test_client()
    page = c.get("/storyteller/")
    assert page.status_code == 200 and 'id="signin"' in page.get_data(as_text=True)
    payload = {
        "maincharacter": "Mia",
        "keywords": "lighthouse",
        "genre": "Mystery",
        "registro": "Vivid",
        "childsafe": True,
        "maxnowords": 100,
        "twist": False,
        "session": "tabAAAA1111",
    }
    assert c.post("/storyteller/api/settings", json=payload).status_code == 401
    assert c.post("/storyteller/api/settings", json=payload, headers={"X-API-Key": key}).status_code == 200
    token = c.post(
        "/storyteller/api/stream-token", json={"session": "tabAAAA1111"}, headers={"X-API-Key": key}
    ).get_json()["token"]
    fake_openai.script("Mia kept the light.")
    stream = c.get(f"/storyteller/stream?session=tabAAAA1111&action=story&token={token}")
    assert stream.status_code == 200 and "Mia kept the light." in stream.get_data(as_text=True)


@pytest.mark.parametrize("frontend", sorted(ROWS))
def test_every_row_builds_an_app(make_app: Any, fake_openai: Any, frontend: str) -> None:
    """Every Settings cell is a valid configuration (typos in the table fail here)."""
    app = make_app(**settings_of(frontend, fake_openai))
    assert app.test_client().get("/health").status_code == 200
