"""Refinement (InsPilot): the real frontend's requests (research note §8, R0-R6 and the negative
cases) replayed against the app with the fake OpenAI server, response shapes checked field by field."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from PIL import Image

from apps.refinement import labels

# the research note's tiny data URL (the frontend sends the canvas export in this form)
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
    "AAAABJRU5ErkJggg=="
)
TASK = "设计一款运动辅助产品"
ITEM_KEYS = ["type", "text", "image", "combinations"]
ENVELOPE_KEYS = {"success", "code", "message", "data"}


def canvas_png(color: tuple[int, int, int] = (20, 20, 20), size: tuple[int, int] = (96, 64)) -> str:
    img = Image.new("RGB", size, (255, 255, 255))
    for x in range(10, 50):
        img.putpixel((x, 30), color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


SAVE_DATA = {
    "designSchemes": {
        "准备": None,
        "快速发散": [
            {
                "name": "",
                "paths": [
                    {
                        "paths": [{"x": 10, "y": 20}, {"x": 15, "y": 26}],
                        "strokeWidth": 5,
                        "strokeColor": "#000000",
                        "drawMode": True,
                    }
                ],
                "texts": [{"text": "可折叠", "position": {"x": 420, "y": 310}}],
                "canvasImage": PNG,
            }
        ],
        "深入发散": [],
        "收敛": [],
        "完成": None,
        "禁止": None,
    },
    "designTask": TASK,
    "currentStage": "快速发散",
}
R3 = {"appid": 0, "type": 0, "prompts": {"task": TASK, "num": 6}}
R4 = {
    "appid": 0,
    "type": 1,
    "prompts": {"designTexts": ["可折叠", "便携"], "designImage": PNG, "schemeId": 0, "designTask": TASK},
}
R5 = {
    "appid": 0,
    "type": 2,
    "prompts": {
        "designTask": TASK,
        "selectNum": 3,
        "schemes": [
            {"designTexts": ["可折叠", "便携"], "designImage": PNG},
            {"designTexts": ["智能计数"], "designImage": PNG},
            {"designTexts": [], "designImage": PNG},
            {"designTexts": ["夜跑照明"], "designImage": PNG},
        ],
    },
}
R6_ONE = {
    "appid": 0,
    "type": 3,
    "prompts": {"selectedSchemes": [{"designTexts": ["可折叠", "便携"]}], "num": 3},
}
R6_TWO = {
    "appid": 0,
    "type": 3,
    "prompts": {"selectedSchemes": [{"designTexts": ["可折叠"]}, {"designTexts": ["智能计数"]}], "num": 2},
}


@pytest.fixture
def c(client: Any) -> Any:
    return client


def post(c: Any, path: str, body: Any, prefix: str = "/refinement") -> tuple[int, dict[str, Any]]:
    resp = c.post(prefix + path, json=body)
    env = resp.get_json()
    assert set(env) == ENVELOPE_KEYS, env
    return resp.status_code, env


def ok(c: Any, path: str, body: Any, prefix: str = "/refinement") -> Any:
    status, env = post(c, path, body, prefix)
    assert status == 200 and env["success"] is True and env["code"] == 0 and env["message"] == "", env
    return env["data"]


def fail(c: Any, path: str, body: Any, status: int, message: str | None = None, code: int = 1) -> str:
    got, env = post(c, "" if path == "" else path, body)
    assert got == status, (got, env)
    assert env["success"] is False and env["code"] == code and env["data"] is None, env
    if message is not None:
        assert env["message"] == message, env
    for leak in ("Traceback", "TypeError", "KeyError", "AttributeError", "NoneType"):
        assert leak not in env["message"]
    return env["message"]


def assert_png_b64(value: Any) -> bytes:
    assert isinstance(value, str) and value and not value.startswith("data:"), str(value)[:40]
    raw = base64.b64decode(value, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(raw)) as img:
        assert img.format == "PNG" and img.size[0] > 1
    return raw


def check_item(item: dict[str, Any], kind: str) -> None:
    assert list(item) == ITEM_KEYS, item.keys()
    assert item["type"] == kind
    if kind.endswith("Image"):
        assert_png_b64(item["image"])
        assert item["text"] is None and item["combinations"] is None
    elif kind.endswith("Text"):
        assert isinstance(item["text"], str) and item["text"].strip()
        assert item["image"] is None and item["combinations"] is None


def check_creative(creative: dict[str, Any], ctype: int, display: str, kinds: list[str]) -> None:
    assert list(creative) == ["type", "displayType", "items"]
    assert creative["type"] == ctype and creative["displayType"] == display
    assert [i["type"] for i in creative["items"]] == kinds
    for it in creative["items"]:
        if it["type"] == labels.GROUP_TWO:
            assert list(it) == ITEM_KEYS and it["text"] is None and it["image"] is None
            assert [x["type"] for x in it["combinations"]] == [
                labels.ABSTRACT_IMAGE,
                labels.CONCRETE_IMAGE,
                labels.CONCRETE_TEXT,
            ]
            for sub in it["combinations"]:
                check_item(sub, sub["type"])
        else:
            check_item(it, it["type"])


def chat_bodies(fake: Any) -> list[dict[str, Any]]:
    return [r["json"] for r in fake.chat_requests()]


def image_parts(body: dict[str, Any]) -> list[str]:
    urls = []
    for msg in body["messages"]:
        if isinstance(msg.get("content"), list):
            urls += [p["image_url"]["url"] for p in msg["content"] if p.get("type") == "image_url"]
    return urls


def schema_of(body: dict[str, Any]) -> dict[str, Any]:
    return body["response_format"]["json_schema"]["schema"]


# ------------------------------------------------------------------ R0-R2
def test_r0_ping(c: Any) -> None:
    for method in (c.get, c.post):
        resp = method("/refinement/ping")
        assert resp.status_code == 200 and resp.data == b"pong" and resp.mimetype == "text/plain"


def test_r1_r2_start_save_start(c: Any, db: Any) -> None:
    data = ok(c, "/paint/start", {"username": "p01"})
    assert list(data) == [
        "_id",
        "username",
        "currentStage",
        "designTask",
        "rapidDivergenceSchemes",
        "deepDivergenceSchemes",
        "convergenceSchemes",
        "sessionId",
    ]
    assert len(data["_id"]) == 24 and int(data["_id"], 16) >= 0
    assert data["username"] == "p01" and data["currentStage"] == "准备" and data["designTask"] == ""
    assert data["rapidDivergenceSchemes"] == data["deepDivergenceSchemes"] == data["convergenceSchemes"] == []
    resp = c.post("/refinement/paint/save", json={"username": "p01", "data": SAVE_DATA})
    assert resp.status_code == 200 and resp.get_json() == {
        "success": True,
        "code": 0,
        "message": "",
        "data": None,
    }
    again = ok(c, "/paint/start", {"username": "p01"})
    assert again["_id"] == data["_id"] and again["sessionId"] != data["sessionId"]
    assert again["rapidDivergenceSchemes"] == SAVE_DATA["designSchemes"]["快速发散"]
    assert again["designTask"] == TASK and again["currentStage"] == "快速发散"
    # a save without a stage key keeps that stage (the original raised KeyError)
    partial = {
        "designSchemes": {"深入发散": [{"name": "d", "paths": [], "texts": []}]},
        "currentStage": "深入发散",
    }
    ok(c, "/paint/save", {"username": "p01", "data": partial})
    third = ok(c, "/paint/start", {"username": "p01"})
    assert third["rapidDivergenceSchemes"] == SAVE_DATA["designSchemes"]["快速发散"]
    assert third["deepDivergenceSchemes"] == [{"name": "d", "paths": [], "texts": []}]
    assert db.refinement_saves.count_documents({"username": "p01"}) == 2


# ------------------------------------------------------------------ R3 type 0
def test_r3_rapid_divergence(c: Any, fake_openai: Any) -> None:
    data = ok(c, "/generate", R3)
    assert list(data) == ["count", "result", "requestId", "stimulusIds"]
    assert data["count"] == len(data["result"]) == 6 == len(data["stimulusIds"])
    for creative in data["result"]:
        check_creative(creative, 0, "sequence", [labels.ABSTRACT_IMAGE, labels.ABSTRACT_TEXT])
    bodies = chat_bodies(fake_openai)
    assert len(bodies) == 4  # products, scenes, SD prompts, concept texts
    for body in bodies:  # every array pinned to exactly num items
        props = schema_of(body)["properties"]
        (arr,) = props.values()
        assert arr["minItems"] == arr["maxItems"] == 6
        assert arr["items"]["maxLength"] > 0
    assert TASK in bodies[0]["messages"][-1]["content"]  # zh templates by default
    assert "设计任务" in bodies[0]["messages"][-1]["content"]


def test_r3_rapid_uses_model_texts_in_order(c: Any, fake_openai: Any) -> None:
    products = [f"产品{i}" for i in range(2)]
    concepts = ["动力带动人体运动", "弹性储能释放"]

    def responder(body: dict[str, Any]) -> Any:
        key = next(iter(schema_of(body)["properties"]))
        text = body["messages"][-1]["content"]
        if key == "products":
            return {"products": products}
        if key == "scenes":
            return {"scenes": ["健身房 ", " 公园"]}
        if key == "prompts":
            return {"prompts": ["gym, treadmill, morning light", "park, grass, sunset"]}
        assert "产品0" in text
        return {"texts": concepts}

    fake_openai.set_responder(responder)
    data = ok(c, "/generate", {"appid": 0, "type": 0, "prompts": {"task": TASK, "num": 2}})
    assert [cr["items"][1]["text"] for cr in data["result"]] == concepts


# ------------------------------------------------------------------ R4 type 1
def test_r4_deep_divergence_with_sketch(c: Any, fake_openai: Any) -> None:
    sketch = canvas_png()
    body = json.loads(json.dumps(R4))
    body["prompts"]["designImage"] = sketch
    data = ok(c, "/generate", body)
    assert list(data) == ["schemeId", "count", "result", "requestId", "stimulusIds"]
    assert data["schemeId"] == 0 and data["count"] == 3 == len(data["result"])
    for creative in data["result"]:
        check_creative(
            creative, 2, "sequence", [labels.ABSTRACT_IMAGE, labels.ABSTRACT_TEXT, labels.CONCRETE_TEXT]
        )
    bodies = chat_bodies(fake_openai)
    assert len(bodies) == 6  # vision name + products, scenes, SD prompts, concepts, functions
    vision = [b for b in bodies if image_parts(b)]
    assert len(vision) == 1 and image_parts(vision[0]) == [sketch]
    assert "可折叠" in vision[0]["messages"][-1]["content"][-1]["text"]


def test_r4_deep_seed003_variant_skips_vision(c: Any, fake_openai: Any) -> None:
    data = ok(c, "/generate", {"appid": 0, "type": 1, "prompts": {"designTexts": ["可折叠"], "schemeId": 4}})
    assert data["schemeId"] == 4 and data["count"] == 3
    bodies = chat_bodies(fake_openai)
    assert len(bodies) == 5 and not any(image_parts(b) for b in bodies)


def test_r4_deep_empty_task_is_allowed(c: Any) -> None:
    body = json.loads(json.dumps(R4))
    body["prompts"]["designTask"] = ""
    assert ok(c, "/generate", body)["count"] == 3


# ------------------------------------------------------------------ R5 type 2
def test_r5_convergence_names_and_recommendation(c: Any, fake_openai: Any) -> None:
    names = ["便携折叠跳绳", "智能计数手环", "无标注方案", "夜跑照明背心"]
    fake_openai.script({"names": names}, {"selected": [4, 1, 2]})
    data = ok(c, "/generate", R5)
    # type 2 carries stimulusIds like types 0, 1 and 3 (issue 17 item 2): one naming stimulus, stored
    assert list(data) == ["names", "selected", "requestId", "stimulusIds"]
    assert len(data["stimulusIds"]) == 1
    db = c.application.extensions["services"].db
    assert db.refinement_stimuli.count_documents({"_id": data["stimulusIds"][0]}) == 1
    assert data["names"] == names
    assert data["selected"] == ["夜跑照明背心", "便携折叠跳绳", "智能计数手环"]
    naming, recommend = chat_bodies(fake_openai)
    assert len(image_parts(naming)) == 4 and not image_parts(recommend)
    assert schema_of(naming)["properties"]["names"]["minItems"] == 4
    sel = schema_of(recommend)["properties"]["selected"]
    assert sel["minItems"] == sel["maxItems"] == 3


def test_r5_repeated_or_unknown_numbers_are_dropped(c: Any, fake_openai: Any) -> None:
    fake_openai.script({"names": ["甲方案名称", "乙方案名称", "丙方案名称"]}, {"selected": [2, 2, 7]})
    body = {
        "appid": 0,
        "type": 2,
        "prompts": {
            "designTask": TASK,
            "selectNum": 3,
            "schemes": [{"designTexts": ["a"]}, {"designTexts": ["b"]}, {"designTexts": ["c"]}],
        },
    }
    data = ok(c, "/generate", body)
    assert data["names"] == ["甲方案名称", "乙方案名称", "丙方案名称"] and data["selected"] == ["乙方案名称"]


def test_r5_default_reply_shapes(c: Any) -> None:
    data = ok(c, "/generate", R5)
    assert len(data["names"]) == 4 and all(isinstance(n, str) and n for n in data["names"])
    assert 1 <= len(data["selected"]) <= 3 and set(data["selected"]) <= set(data["names"])


def test_r5_select_num_clamped_and_seed003_variant(c: Any, fake_openai: Any) -> None:
    """seed 003: no designTask, schemes without designImage; selectNum larger than the scheme count."""
    body = {
        "appid": 0,
        "type": 2,
        "prompts": {"selectNum": 3, "schemes": [{"designTexts": ["可折叠"]}, {"designTexts": ["智能计数"]}]},
    }
    data = ok(c, "/generate", body)
    assert len(data["names"]) == 2 and len(data["selected"]) == 2
    assert not any(image_parts(b) for b in chat_bodies(fake_openai))


# ------------------------------------------------------------------ R6 type 3
@pytest.mark.parametrize("body,total", [(R6_ONE, 3), (R6_TWO, 4)])
def test_r6_convergence_stimuli(c: Any, fake_openai: Any, body: dict[str, Any], total: int) -> None:
    data = ok(c, "/generate", body)
    assert list(data) == ["result", "requestId", "stimulusIds"]
    assert len(data["result"]) == total
    for creative in data["result"]:
        check_creative(creative, 4, "direct", [labels.GROUP_TWO])
    bodies = chat_bodies(fake_openai)
    assert len(bodies) == 4
    grouped = [
        schema_of(b)["properties"]["schemes"] for b in bodies if "schemes" in schema_of(b)["properties"]
    ]
    n_schemes = len(body["prompts"]["selectedSchemes"])
    assert len(grouped) == 2 and all(g["minItems"] == g["maxItems"] == n_schemes for g in grouped)


# ------------------------------------------------------------------ negative replays
NEGATIVE = [
    ({"appid": 1, "type": 0, "prompts": {"task": "x", "num": 6}}, labels.MSG_APP_MISSING),
    ({"appid": 0, "type": 9, "prompts": {}}, labels.MSG_INVALID_TYPE),
    ({"appid": 0, "type": 0, "prompts": {"task": "", "num": 6}}, labels.MSG_TASK_MISSING),
    ({"appid": 0, "type": 0, "prompts": {"task": "x"}}, labels.MSG_NUM_MISSING),
    ({"appid": 0, "type": 0, "prompts": {"task": "x", "num": 0}}, labels.MSG_NUM_MISSING),
    (
        {
            "appid": 0,
            "type": 1,
            "prompts": {"designTexts": [], "designImage": PNG, "schemeId": 0, "designTask": "x"},
        },
        labels.MSG_TEXTS_MISSING,
    ),
    (
        {"appid": 0, "type": 1, "prompts": {"designTexts": ["a"], "designImage": PNG, "designTask": "x"}},
        labels.MSG_SCHEME_ID_MISSING,
    ),
    (
        {"appid": 0, "type": 1, "prompts": {"designTexts": ["a"], "designImage": PNG, "schemeId": 0}},
        labels.MSG_TASK_MISSING,
    ),
    (
        {
            "appid": 0,
            "type": 2,
            "prompts": {"designTask": "", "selectNum": 3, "schemes": [{"designTexts": ["a"]}]},
        },
        labels.MSG_DESCRIPTION_MISSING,
    ),
    (
        {"appid": 0, "type": 2, "prompts": {"designTask": "x", "selectNum": 3, "schemes": []}},
        labels.MSG_SCHEMES_MISSING,
    ),
    # the frontend's refill effect on a reloaded state (research note §7.16)
    ({"appid": 0, "type": 3, "prompts": {"selectedSchemes": [], "num": 0}}, labels.MSG_SCHEMES_MISSING),
    (
        {"appid": 0, "type": 3, "prompts": {"selectedSchemes": [{"designTexts": ["a"]}], "num": 0}},
        labels.MSG_NUM_MISSING,
    ),
]


@pytest.mark.parametrize("body,message", NEGATIVE)
def test_negative_generate(c: Any, fake_openai: Any, db: Any, body: dict[str, Any], message: str) -> None:
    fail(c, "/generate", body, 400, message)
    assert fake_openai.chat_requests() == []  # rejected before any model call
    assert db.refinement_requests.count_documents({}) == 0


def test_negative_paint(c: Any) -> None:
    assert fail(c, "/paint/start", {"username": ""}, 400) == labels.MSG_USER_EMPTY
    assert fail(c, "/paint/start", {}, 400) == labels.MSG_USER_EMPTY  # the original created a user named null
    assert (
        fail(c, "/paint/save", {"username": "nobody-xyz", "data": SAVE_DATA}, 404) == labels.MSG_USER_MISSING
    )
    assert fail(c, "/paint/save", {"username": "p01", "data": None}, 400) == labels.MSG_USER_OR_DATA_EMPTY
    assert fail(c, "/paint/save", {"data": SAVE_DATA}, 400) == labels.MSG_USER_OR_DATA_EMPTY
    ok(c, "/paint/start", {"username": "p01"})
    bad = {"designSchemes": {"快速发散": "not a list"}}
    assert "data.designSchemes" in fail(c, "/paint/save", {"username": "p01", "data": bad}, 422)


VALIDATION = [
    ({"appid": 0, "type": 0, "prompts": {"task": "x", "num": 13}}, "prompts.num"),
    ({"appid": 0, "type": 0, "prompts": {"task": "x", "num": -1}}, "prompts.num"),
    ({"appid": 0, "type": 0, "prompts": {"task": "x", "num": "six"}}, "prompts.num"),
    ({"appid": 0, "type": 0, "prompts": {"task": "x", "num": 6, "language": "fr"}}, "prompts.language"),
    (
        {"appid": 0, "type": 2, "prompts": {"designTask": "x", "schemes": [{"designTexts": ["a"]}]}},
        "prompts.selectNum",
    ),
    (
        {
            "appid": 0,
            "type": 2,
            "prompts": {"designTask": "x", "selectNum": 0, "schemes": [{"designTexts": ["a"]}]},
        },
        "prompts.selectNum",
    ),
    (
        {
            "appid": 0,
            "type": 2,
            "prompts": {"designTask": "x", "selectNum": 13, "schemes": [{"designTexts": ["a"]}]},
        },
        "prompts.selectNum",
    ),
    ({"appid": 0, "type": 1, "prompts": {"designTexts": "可折叠", "schemeId": 0}}, "prompts.designTexts"),
    (
        {"appid": 0, "type": 3, "prompts": {"selectedSchemes": [{"designTexts": ["a"]}] * 5, "num": 4}},
        "prompts.selectedSchemes x prompts.num",
    ),
    ({"appid": 0, "type": 0, "prompts": None}, "prompts"),
    ({"appid": "zero", "type": 0, "prompts": {}}, "appid"),
    ({"type": 0, "prompts": {}}, "appid"),
]


@pytest.mark.parametrize("body,where", VALIDATION)
def test_validation_is_422_with_envelope(c: Any, fake_openai: Any, body: dict[str, Any], where: str) -> None:
    message = fail(c, "/generate", body, 422)
    assert where in message, message
    assert fake_openai.chat_requests() == []


def test_bad_bodies(c: Any) -> None:
    resp = c.post("/refinement/generate", data="{not json", content_type="application/json")
    assert resp.status_code == 400 and resp.get_json()["success"] is False
    resp = c.post("/refinement/generate", data=json.dumps(R3), content_type="text/plain")
    assert resp.status_code == 415 and resp.get_json()["success"] is False
    resp = c.post("/refinement/generate")
    assert resp.status_code in (400, 415) and resp.get_json()["success"] is False
    resp = c.get("/refinement/generate")
    assert resp.status_code == 405 and resp.get_json()["success"] is False
    garbage = {
        "appid": 0,
        "type": 1,
        "prompts": {**R4["prompts"], "designImage": "data:image/png;base64,AAAA"},
    }
    got, env = post(c, "/generate", garbage)
    assert got in (415, 422) and "designImage" in env["message"] and env["success"] is False


def test_options_preflight(c: Any) -> None:
    for path in ("/ping", "/generate", "/paint/start", "/paint/save"):
        resp = c.options(
            "/refinement" + path,
            headers={
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert resp.status_code == 200, path
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "content-type" in resp.headers["Access-Control-Allow-Headers"].lower()
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]


def test_root_mount(make_app: Any, fake_openai: Any) -> None:
    app = make_app(
        LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k", ROOT_APP="refinement"
    )
    c = app.test_client()
    assert c.get("/ping").data == b"pong"
    assert c.get("/refinement/ping").data == b"pong"
    data = ok(c, "/paint/start", {"username": "root-user"}, prefix="")
    assert data["username"] == "root-user"
    out = ok(c, "/generate", {"appid": 0, "type": 0, "prompts": {"task": TASK, "num": 2}}, prefix="")
    assert out["count"] == 2
    status, env = post(c, "/generate", {"appid": 7, "type": 0, "prompts": {}}, prefix="")
    assert status == 400 and env["message"] == labels.MSG_APP_MISSING
    resp = c.post("/paint/save", json={"username": "ghost", "data": SAVE_DATA})
    assert resp.status_code == 404 and resp.get_json()["message"] == labels.MSG_USER_MISSING


def test_language_per_request_and_setting(make_app: Any, fake_openai: Any) -> None:
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k")
    c = app.test_client()
    ok(
        c,
        "/generate",
        {"appid": 0, "type": 0, "prompts": {"task": "a sports aid", "num": 2, "language": "en"}},
    )
    first = chat_bodies(fake_openai)[0]["messages"][-1]["content"]
    assert "Propose 2 products" in first and "设计任务" not in first
    fake_openai.reset()
    app_en = make_app(
        LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k", REFINEMENT_LANGUAGE="en"
    )
    ok(app_en.test_client(), "/generate", {"appid": 0, "type": 3, "prompts": R6_ONE["prompts"]})
    assert all("设计" not in b["messages"][-1]["content"] for b in chat_bodies(fake_openai))
    fake_openai.reset()
    ok(
        app_en.test_client(),
        "/generate",
        {"appid": 0, "type": 0, "prompts": {"task": TASK, "num": 1, "language": "zh"}},
    )
    assert "设计任务" in chat_bodies(fake_openai)[0]["messages"][-1]["content"]


def test_openapi_lists_routes(c: Any) -> None:
    paths = c.get("/openapi.json").get_json()["paths"]
    for path in (
        "/refinement/generate",
        "/refinement/paint/start",
        "/refinement/paint/save",
        "/refinement/users/{username}/sessions",
        "/refinement/users/{username}/stimuli",
        "/refinement/stimuli/{stimulus_id}",
        "/refinement/requests/{request_id}",
        "/refinement/refine/img2img",
        "/refinement/refine/inpaint",
        "/refinement/refine/tree/{image_id}",
    ):
        assert path in paths, path
