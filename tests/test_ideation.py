"""Ideation (StepIdeator): the frontend's requests replayed against the fake model servers."""

from __future__ import annotations

import io
import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

TASK = "设计一款适用于丘陵果园的农业植保无人机"
BRIEF, SKETCH, MODEL, RENDER = (
    "设计摘要的辅助生成",
    "草图的辅助生成",
    "模型图的辅助生成",
    "场景与产品渲染图的辅助生成",
)


def png(color: tuple[int, int, int] = (10, 10, 10), size: int = 64) -> bytes:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    for x in range(size // 4, 3 * size // 4):
        for y in range(size // 4, 3 * size // 4):
            img.putpixel((x, y), color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def body(button: str, ai_stage: str, **over: Any) -> dict[str, Any]:
    base = {
        "username": "10",
        "designTask": TASK,
        "currentNum": 1,
        "currentAIStage": ai_stage,
        "currentStage": "草图的环境",
        "selectedTexts": [],
        "selectedCanvasRecords": [],
        "selectedButtonInfo": {"buttonText": button, "aiStage": ai_stage},
    }
    base.update(over)
    return base


@pytest.fixture
def app(make_app: Any, fake_openai: Any, fake_sd_fleet: Any) -> Any:
    fleet = fake_sd_fleet(2)
    return make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        SD_INSTANCES=",".join(f.url for f in fleet),
        IMAGE_PROVIDER="sdwebui",
        SD_SAM_ENABLED=True,
    )


@pytest.fixture
def c(app: Any) -> Any:
    return app.test_client()


def upload(c: Any, data: bytes, name: str = "canvas.png", path: str = "/ideation/upload") -> dict[str, Any]:
    resp = c.post(
        path, data={"file": (io.BytesIO(data), name, "image/png")}, content_type="multipart/form-data"
    )
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def assert_images(c: Any, data: dict[str, str], n: int) -> list[bytes]:
    assert list(data.keys()) == [str(i) for i in range(n)]
    out = []
    for url in data.values():
        assert url.endswith(".png") and url.startswith("http")
        got = c.get(url[url.index("/images/") :])
        assert got.status_code == 200 and got.mimetype == "image/png"
        assert len(got.data) > 100
        out.append(got.data)
    return out


def test_brief_new_returns_json_strings(c: Any, fake_openai: Any) -> None:
    resp = c.post(
        "/ideation/generate", json=body("生成全新摘要", BRIEF, currentNum=2, currentStage="设计摘要的环境")
    )
    env = resp.get_json()
    assert resp.status_code == 200 and env["success"] is True and env["code"] == 0
    assert list(env["data"].keys()) == ["0", "1"]
    for value in env["data"].values():
        brief = json.loads(value)
        assert set(brief) >= {"目标人群", "使用场景", "痛点", "主要功能"}
    # one call asks for both briefs (distinct items in one reply), plus nothing else
    chats = [r for r in fake_openai.requests if r["path"].endswith("/chat/completions")]
    assert len(chats) == 1


def test_brief_reference_and_extend(c: Any) -> None:
    ref = c.post(
        "/ideation/generate", json=body("现有产品参考", BRIEF, selectedTexts=["续航时间短"])
    ).get_json()
    assert ref["success"] and "产品名" in json.loads(ref["data"]["0"])
    ext = c.post(
        "/ideation/generate",
        json=body(
            "扩展/增加", BRIEF, currentNum=3, selectedTexts=["目标人群：山区果农", "主要功能：自动避障"]
        ),
    ).get_json()
    assert ext["success"] and list(ext["data"]) == ["0"]  # extend is always one item
    missing = c.post("/ideation/generate", json=body("扩展/增加", BRIEF, selectedTexts=[]))
    assert missing.status_code == 400 and missing.get_json()["message"] == "用户选择文本缺失"


def test_sketch_new_uses_task_object_and_checkpoint(c: Any, fake_openai: Any, fake_sd_fleet: Any) -> None:
    fake_openai.script({"object": "orchard drone"})
    resp = c.post("/ideation/generate", json=body("生成全新草图", SKETCH, currentNum=3)).get_json()
    assert resp["success"], resp
    assert_images(c, resp["data"], 3)


def test_sketch_reference_shape_c(c: Any) -> None:
    resp = c.post(
        "/ideation/generate",
        json=body("现有产品参考", SKETCH, currentNum=3, selectedTexts=["可折叠机臂", "大容量药箱"]),
    ).get_json()
    assert resp["success"], resp
    advice, images = resp["data"]
    assert set(json.loads(advice["0"])) == {"外观造型", "内部结构"}
    assert_images(c, images, 1)  # n forced to 1


def test_sketch_extend_uses_this_users_upload(c: Any, app: Any) -> None:
    url = upload(c, png((200, 0, 0)))["url"]
    assert url.endswith(".png")
    resp = c.post(
        "/ideation/generate", json=body("扩展/添加", SKETCH, currentNum=2, selectedCanvasRecords=[url])
    ).get_json()
    assert resp["success"], resp
    assert_images(c, resp["data"], 2)
    no_canvas = c.post("/ideation/generate", json=body("扩展/添加", SKETCH)).get_json()
    assert no_canvas["success"] is False and no_canvas["message"] == "参考图像缺失"


def test_two_users_get_their_own_sketches(make_app: Any, fake_openai: Any, fake_sd_fleet: Any) -> None:
    """The original overwrote one shared canvas.png; here each request uses its own upload."""
    import base64

    fleet = fake_sd_fleet(2)
    app = make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        SD_INSTANCES=",".join(f.url for f in fleet),
        IMAGE_PROVIDER="sdwebui",
    )
    c = app.test_client()
    red, blue = png((220, 0, 0)), png((0, 0, 220))
    urls = {"u1": upload(c, red)["url"], "u2": upload(c, blue)["url"]}
    results: dict[str, Any] = {}

    def run(user: str) -> None:
        results[user] = (
            app.test_client()
            .post(
                "/ideation/generate",
                json=body("扩展/添加", SKETCH, username=user, selectedCanvasRecords=[urls[user]]),
            )
            .get_json()
        )

    threads = [threading.Thread(target=run, args=(u,)) for u in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results["u1"]["success"] and results["u2"]["success"]
    db = app.extensions["services"].db
    for user, expected in (("u1", red), ("u2", blue)):
        doc = db.ideation_requests.find_one({"username": user})
        assert app.extensions["services"].images.load(doc["canvas_image_id"]) == expected
    # each SD request carried the sketch of the user who asked, as its ControlNet image
    sent = set()
    for fake in fleet:
        for req in fake.requests:
            units = (
                ((req.get("json") or {}).get("alwayson_scripts") or {}).get("controlnet", {}).get("args", [])
            )
            sent.update(u.get("image", "").split(",")[-1] for u in units)
    assert {base64.b64encode(red).decode(), base64.b64encode(blue).decode()} <= sent


def test_sketch_convert_text_and_canvas(c: Any) -> None:
    text_only = c.post(
        "/ideation/generate", json=body("转换为草图", SKETCH, selectedTexts=["流线型机身"])
    ).get_json()
    assert text_only["success"], text_only
    url = upload(c, png())["url"]
    with_canvas = c.post(
        "/ideation/generate", json=body("转换为草图", SKETCH, selectedCanvasRecords=[url])
    ).get_json()
    assert with_canvas["success"], with_canvas
    neither = c.post("/ideation/generate", json=body("转换为草图", SKETCH)).get_json()
    assert neither["message"] == "参考图像或文本缺失"


def test_model_new_and_convert_stages(c: Any) -> None:
    new = c.post(
        "/ideation/generate", json=body("生成全新模型", MODEL, currentStage="模型图的环境")
    ).get_json()
    assert new["success"], new
    url = upload(c, png())["url"]
    for stage in ("草图的环境", "场景与产品渲染图的环境"):
        ok = c.post(
            "/ideation/generate",
            json=body("转化为白模图", MODEL, currentNum=2, currentStage=stage, selectedCanvasRecords=[url]),
        ).get_json()
        assert ok["success"], ok
        assert_images(c, ok["data"], 2)
    wrong = c.post(
        "/ideation/generate",
        json=body("转化为白模图", MODEL, currentStage="模型图的环境", selectedCanvasRecords=[url]),
    )
    assert wrong.status_code == 400
    assert wrong.get_json() == {"success": False, "code": 1, "message": "用户阶段错误", "data": None}


def test_multiview_off_unless_configured(c: Any) -> None:
    url = upload(c, png())["url"]
    resp = c.post("/ideation/generate", json=body("多角度拓展", MODEL, selectedCanvasRecords=[url]))
    assert resp.status_code == 503
    assert resp.get_json()["success"] is False and "IDEATION_MULTIVIEW_CMD" in resp.get_json()["message"]


def test_multiview_runs_configured_command_without_shell(
    make_app: Any, fake_openai: Any, tmp_path: Path
) -> None:
    tool = tmp_path / "views.py"
    tool.write_text(
        "import sys, shutil, pathlib\n"
        "src, out = sys.argv[1], pathlib.Path(sys.argv[2])\n"
        "for i in range(6): shutil.copy(src, out / f'normals_{i}.png')\n"
    )
    app = make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        IDEATION_MULTIVIEW_CMD=f"{sys.executable} {tool} {{input}} {{output}}",
    )
    c = app.test_client()
    url = upload(c, png())["url"]
    resp = c.post(
        "/ideation/generate",
        json=body("多角度拓展", MODEL, username="a;rm -rf x", selectedCanvasRecords=[url]),
    )
    assert resp.status_code == 422  # usernames are restricted to a safe pattern
    resp = c.post(
        "/ideation/generate", json=body("多角度拓展", MODEL, selectedCanvasRecords=[url])
    ).get_json()
    assert resp["success"], resp
    (views,) = resp["data"]
    assert_images(c, views, 6)


def test_rendering_buttons(c: Any, fake_sd_fleet: Any) -> None:
    new = c.post(
        "/ideation/generate",
        json=body("生成全新场景", RENDER, currentNum=3, currentStage="场景与产品渲染图的环境"),
    ).get_json()
    assert new["success"], new
    assert_images(c, new["data"], 3)
    ref = c.post("/ideation/generate", json=body("现有产品参考", RENDER, currentNum=2)).get_json()
    assert ref["success"], ref
    assert_images(c, ref["data"], 2)
    url = upload(c, png())["url"]
    ext = c.post(
        "/ideation/generate", json=body("扩展至场景", RENDER, selectedCanvasRecords=[url])
    ).get_json()
    assert ext["success"], ext
    conv = c.post(
        "/ideation/generate",
        json=body("转化为渲染图", RENDER, currentStage="模型图的环境", selectedCanvasRecords=[url]),
    ).get_json()
    assert conv["success"], conv
    bad_stage = c.post(
        "/ideation/generate",
        json=body("转化为渲染图", RENDER, currentStage="设计摘要的环境", selectedCanvasRecords=[url]),
    ).get_json()
    assert bad_stage["message"] == "用户阶段错误"


def test_english_aliases(c: Any) -> None:
    resp = c.post("/ideation/generate", json=body("new", "sketch", currentNum=1)).get_json()
    assert resp["success"], resp


@pytest.mark.parametrize(
    "change,message",
    [
        ({"selectedButtonInfo": {"buttonText": "转化为摘要", "aiStage": BRIEF}}, "无效的任务类型"),
        ({"selectedButtonInfo": {"buttonText": "生成全新草图", "aiStage": "未知"}}, "无效的任务类型"),
        ({"designTask": ""}, "设计任务缺失"),
        ({"currentNum": 0}, "设计数量缺失"),
    ],
)
def test_business_errors(c: Any, change: dict, message: str) -> None:
    resp = c.post("/ideation/generate", json={**body("生成全新草图", SKETCH), **change})
    assert resp.status_code == 400
    assert resp.get_json() == {"success": False, "code": 1, "message": message, "data": None}


def test_validation_errors_are_enveloped_4xx(c: Any) -> None:
    too_many = c.post("/ideation/generate", json=body("生成全新草图", SKETCH, currentNum=9))
    assert too_many.status_code == 422 and too_many.get_json()["success"] is False
    no_button = c.post("/ideation/generate", json={"designTask": TASK})
    assert no_button.status_code == 422 and no_button.get_json()["success"] is False
    bad_json = c.post("/ideation/generate", data="{nope", content_type="application/json")
    assert bad_json.status_code == 400 and bad_json.get_json()["success"] is False
    bad_canvas = c.post(
        "/ideation/generate",
        json=body("扩展/添加", SKETCH, selectedCanvasRecords=["http://evil.example/x.png"]),
    )
    assert bad_canvas.status_code == 422


def test_failed_generation_is_an_error_never_an_empty_image(
    make_app: Any, fake_openai: Any, fake_sd: Any
) -> None:
    app = make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        SD_INSTANCES=fake_sd.url,
        IMAGE_PROVIDER="sdwebui",
        SD_MAX_ATTEMPTS=2,
        SD_WAIT_TIMEOUT_S=3,
    )
    fake_sd.empty_images_next(10)
    resp = app.test_client().post("/ideation/generate", json=body("生成全新草图", SKETCH))
    assert resp.status_code in (502, 503)
    env = resp.get_json()
    assert env["success"] is False and env["data"] is None
    doc = app.extensions["services"].db.ideation_requests.find_one({"username": "10"})
    assert doc["status"] == "failed"


def test_upload_errors(c: Any) -> None:
    none = c.post("/ideation/upload", data={}, content_type="multipart/form-data")
    assert none.status_code == 400 and none.get_json()["error"] == "No file provided"
    not_image = c.post(
        "/ideation/uploadImage",
        data={"file": (io.BytesIO(b"hello"), "x.png")},
        content_type="multipart/form-data",
    )
    assert not_image.status_code == 415
    ok = upload(c, png(), "photo.png", "/ideation/uploadImage")
    assert ok["success"] is True and ok["url"].endswith(".png")


def test_time_records_paint_state_and_history(c: Any, app: Any) -> None:
    timing = {
        "username": "10",
        "stageSwitchRecords": {
            "设计摘要的环境": [{"startTime": 1710396426000, "duration": 95000}],
            "草图的环境": [{"startTime": 1710396521000}],
        },
        "aiStageSwitchRecords": {BRIEF: [{"startTime": 1710396426000, "duration": 60000}]},
    }
    for _ in range(2):
        r = c.post("/ideation/timeRecord", json=timing)
        assert r.get_json() == {"success": True, "message": "Timing records saved successfully"}
    assert app.extensions["services"].db.ideation_time_records.count_documents({"username": "10"}) == 2
    start = c.post("/ideation/paint/start", json={"username": "10"}).get_json()
    assert start["success"] and start["data"]["sketchSchemes"] == []
    save = c.post(
        "/ideation/paint/save",
        json={
            "username": "10",
            "data": {
                "designSchemes": {
                    "草图的环境": [
                        {
                            "name": "",
                            "paths": [],
                            "texts": [{"text": "可折叠机臂", "position": {"x": 412, "y": 300}}],
                        }
                    ]
                },
                "designTask": TASK,
                "currentStage": "草图的环境",
            },
        },
    ).get_json()
    assert save == {"success": True, "code": 0, "message": "", "data": None}
    again = c.post("/ideation/paint/start", json={"username": "10"}).get_json()["data"]
    assert again["sketchSchemes"][0]["texts"][0]["text"] == "可折叠机臂" and again["designTask"] == TASK
    assert c.post("/ideation/paint/start", json={"username": ""}).get_json()["message"] == "用户名字为空"
    nobody = c.post("/ideation/paint/save", json={"username": "nobody", "data": {"designSchemes": {}}})
    assert nobody.status_code == 404 and nobody.get_json()["message"] == "用户不存在"
    c.post("/ideation/generate", json=body("生成全新草图", SKETCH))
    hist = c.get("/ideation/users/10/history").get_json()["data"]
    assert hist["requests"][0]["op"] == "sketch.new" and hist["requests"][0]["images"][0].endswith(".png")
    assert len(hist["timeRecords"]) == 2


def test_root_mount_and_ping(make_app: Any, fake_openai: Any) -> None:
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, ROOT_APP="ideation")
    c = app.test_client()
    assert c.get("/ideation/ping").data == b"pong"
    resp = c.post("/generate", json=body("生成全新摘要", BRIEF)).get_json()
    assert resp["success"], resp
    pre = c.options(
        "/generate",
        headers={
            "Origin": "http://127.0.0.1:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert pre.status_code == 200 and pre.headers["Access-Control-Allow-Origin"] == "*"


def test_endpoints_in_openapi(c: Any) -> None:
    paths = c.get("/openapi.json").get_json()["paths"]
    for p in (
        "/ideation/generate",
        "/ideation/upload",
        "/ideation/uploadImage",
        "/ideation/timeRecord",
        "/ideation/paint/start",
        "/ideation/paint/save",
        "/ideation/users/{username}/history",
    ):
        assert p in paths, p
