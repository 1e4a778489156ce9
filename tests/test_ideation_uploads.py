"""StepIdeator's cloud-button upload (`POST /uploadImage`, file only) gets an owner (issue 17 item 3)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

TASK = "设计一款适用于丘陵果园的农业植保无人机"
BRIEF = "设计摘要的辅助生成"
UA_A = "Mozilla/5.0 (lab PC 1)"
UA_B = "Mozilla/5.0 (lab PC 2)"


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (40, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def brief_request(username: str) -> dict[str, Any]:
    """Replay 1 of research/ideation-stepideator.md §8 (a named request)."""
    return {
        "username": username,
        "designTask": TASK,
        "currentNum": 1,
        "currentAIStage": BRIEF,
        "currentStage": "设计摘要的环境",
        "selectedTexts": [],
        "selectedCanvasRecords": [],
        "selectedButtonInfo": {"buttonText": "生成全新摘要", "aiStage": BRIEF},
    }


def cloud_upload(c: Any, ua: str, headers: dict[str, str] | None = None) -> str:
    """Replay 16: multipart `file` only, as the frontend sends it; returns the stored image id."""
    resp = c.post(
        "/ideation/uploadImage",
        data={"file": (io.BytesIO(png()), "photo.png", "image/png")},
        content_type="multipart/form-data",
        headers={"User-Agent": ua, **(headers or {})},
    )
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["success"] is True and body["url"].endswith(".png")
    return body["url"].rsplit("/images/", 1)[1][: -len(".png")]


def meta(app: Any, image_id: str) -> dict[str, Any]:
    return app.extensions["services"].db["images.files"].find_one({"_id": image_id})["metadata"]


@pytest.fixture
def app(make_app: Any, fake_openai: Any) -> Any:
    return make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k")


def test_upload_after_a_named_request_belongs_to_that_participant(app: Any) -> None:
    c = app.test_client()
    assert c.post("/ideation/generate", json=brief_request("10"), headers={"User-Agent": UA_A}).get_json()[
        "success"
    ]
    assert c.post("/ideation/generate", json=brief_request("11"), headers={"User-Agent": UA_B}).get_json()[
        "success"
    ]
    image_a, image_b = cloud_upload(c, UA_A), cloud_upload(c, UA_B)
    assert (meta(app, image_a)["user"], meta(app, image_a)["user_source"]) == ("10", "client")
    assert meta(app, image_b)["user"] == "11"
    # the participant's export/history sees it: it is stored under their name
    db = app.extensions["services"].db
    assert db["images.files"].count_documents({"metadata.app": "ideation", "metadata.user": "10"}) == 1


def test_upload_before_any_named_request_is_claimed_by_the_next_one(app: Any) -> None:
    c = app.test_client()
    image_id = cloud_upload(c, UA_A)
    assert meta(app, image_id)["user"] is None
    other = cloud_upload(c, UA_B)
    timings = {
        "username": "12",
        "stageSwitchRecords": {"设计摘要的环境": [{"startTime": 1710396426000}]},
        "aiStageSwitchRecords": {},
    }
    assert c.post("/ideation/timeRecord", json=timings, headers={"User-Agent": UA_A}).status_code == 200
    assert (meta(app, image_id)["user"], meta(app, image_id)["user_source"]) == ("12", "client")
    assert meta(app, other)["user"] is None  # another browser's upload is not claimed


def test_stated_username_wins(app: Any) -> None:
    c = app.test_client()
    c.post("/ideation/generate", json=brief_request("10"), headers={"User-Agent": UA_A})
    resp = c.post(
        "/ideation/uploadImage?username=13",
        data={"file": (io.BytesIO(png()), "p.png", "image/png")},
        content_type="multipart/form-data",
        headers={"User-Agent": UA_A},
    )
    image_id = resp.get_json()["url"].rsplit("/images/", 1)[1][:-4]
    assert (meta(app, image_id)["user"], meta(app, image_id)["user_source"]) == ("13", "form")
    bad = c.post(
        "/ideation/uploadImage?username=$x",
        data={"file": (io.BytesIO(png()), "p.png", "image/png")},
        content_type="multipart/form-data",
    )
    assert bad.status_code == 422


def test_with_auth_on_the_upload_belongs_to_the_authenticated_user(make_app: Any, fake_openai: Any) -> None:
    from apps.core.auth import create_user

    app = make_app(
        LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k", AUTH_MODE="apikey"
    )
    key = create_user(app.extensions["services"].db, "alice")
    image_id = cloud_upload(app.test_client(), UA_A, headers={"X-API-Key": key})
    assert (meta(app, image_id)["user"], meta(app, image_id)["user_source"]) == ("alice", "auth")
