"""Refinement: what is stored (stimuli with provenance, sessions, history API), concurrency, failures
leaving nothing behind, and the img2img / inpaint version tree."""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

import pytest
from bson import ObjectId
from PIL import Image

from tests.test_refinement import R3, R4, R6_TWO, TASK, assert_png_b64, canvas_png, ok, post


def fake_app(make_app: Any, fake_openai: Any, **over: Any) -> Any:
    return make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k", **over)


@pytest.fixture
def app(make_app: Any, fake_openai: Any) -> Any:
    return fake_app(make_app, fake_openai)


@pytest.fixture
def c(app: Any) -> Any:
    return app.test_client()


def stored_png(app: Any, image_id: str) -> bytes:
    return app.extensions["services"].images.load(image_id)


def refinement_images(db: Any) -> list[dict[str, Any]]:
    return list(db["images.files"].find({"metadata.app": "refinement"}))


# ------------------------------------------------------------------ persistence + provenance
def test_every_stimulus_is_stored_with_provenance(app: Any, c: Any, db: Any) -> None:
    start = ok(c, "/paint/start", {"username": "p01"})
    data = ok(c, "/generate", R3)
    prompts = app.extensions["services"].prompts
    docs = {d["_id"]: d for d in db.refinement_stimuli.find({"request_id": data["requestId"]})}
    assert list(docs) and sorted(docs) == sorted(data["stimulusIds"])
    for sid, creative in zip(data["stimulusIds"], data["result"], strict=True):
        doc = docs[sid]
        # same client as /paint/start, no username on /generate (the real frontend): inferred
        assert (doc["username"], doc["session"], doc["attribution"]) == (
            "p01",
            start["sessionId"],
            "inferred",
        )
        assert doc["gen_type"] == 0 and doc["stage"] == "rapid" and doc["language"] == "zh"
        image_item, text_item = doc["items"]
        assert stored_png(app, image_item["image_id"]) == base64.b64decode(creative["items"][0]["image"])
        assert text_item["text"] == creative["items"][1]["text"] == doc["texts"]["concept"]
        assert {"product", "scene", "concept"} <= set(doc["texts"])
        (img,) = doc["images"]
        assert img["prompt"] in img["positive"] and img["negative"]
        assert img["templates"]["positive"]["template"] == "refinement/zh/sd_scene_positive"
        prov = doc["provenance"]
        assert set(prov) == {"products", "concept_texts", "scenes", "scene_sd_prompts", "scene_images"}
        for step in ("products", "scenes", "scene_sd_prompts", "concept_texts"):
            name = f"refinement/zh/{step}"
            assert prov[step]["template"] == name and prov[step]["template_hash"] == prompts.get(name).hash
            gen = db.generations.find_one({"_id": ObjectId(prov[step]["generation_id"])})
            assert gen["template"] == name and gen["template_hash"] == prompts.get(name).hash
            assert gen["app"] == "refinement" and gen["user"] == "p01" and gen["job"] == data["requestId"]
        assert img["generation_id"] in prov["scene_images"]["generation_ids"]
    request = db.refinement_requests.find_one({"_id": data["requestId"]})
    assert request["status"] == "done" and request["input"] == {"task": TASK, "num": 6}
    assert len(request["image_ids"]) == 6 and len(refinement_images(db)) == 6


def test_sketches_are_stored_and_linked(app: Any, c: Any, db: Any) -> None:
    sketch = canvas_png((200, 0, 0))
    body = {"appid": 0, "type": 1, "username": "p02", "prompts": {**R4["prompts"], "designImage": sketch}}
    data = ok(c, "/generate", body)
    request = db.refinement_requests.find_one({"_id": data["requestId"]})
    assert request["attribution"] == "explicit" and request["username"] == "p02"
    sketch_id = request["input"]["designImageId"]
    assert "designImage" not in request["input"] and request["sketch_ids"] == [sketch_id]
    assert stored_png(app, sketch_id) == base64.b64decode(sketch.split(",", 1)[1])
    stim = db.refinement_stimuli.find_one({"request_id": data["requestId"]})
    assert (
        stim["scheme_id"] == 0
        and stim["texts"]["name"]
        and stim["texts"]["scheme"].startswith(stim["texts"]["name"])
    )
    assert {"vision_name", "products", "function_texts"} <= set(stim["provenance"])


def test_history_endpoints(app: Any, c: Any, db: Any) -> None:
    session = ok(c, "/paint/start", {"username": "p03"})["sessionId"]
    rapid = ok(c, "/generate", {**R3, "sessionId": session, "prompts": {"task": TASK, "num": 2}})
    names = ok(
        c,
        "/generate",
        {
            "appid": 0,
            "type": 2,
            "prompts": {
                "designTask": TASK,
                "selectNum": 1,
                "sessionId": session,
                "schemes": [{"designTexts": ["a"]}],
            },
        },
    )
    ok(c, "/paint/save", {"username": "p03", "data": {"designTask": TASK, "currentStage": "收敛"}})
    sessions = c.get("/refinement/users/p03/sessions").get_json()
    assert sessions["success"] is True
    (row,) = sessions["data"]["sessions"]
    assert row["sessionId"] == session and row["requests"] == 2 and row["stimuli"] == 3 and row["saves"] == 1
    page = c.get("/refinement/users/p03/stimuli?limit=2").get_json()["data"]
    assert len(page["stimuli"]) == 2 and page["next"]
    rest = c.get(f"/refinement/users/p03/stimuli?before={page['next']}").get_json()["data"]
    assert len(rest["stimuli"]) == 1 and rest["next"] is None
    by_type = c.get("/refinement/users/p03/stimuli?type=0").get_json()["data"]["stimuli"]
    assert sorted(s["id"] for s in by_type) == sorted(rapid["stimulusIds"])
    one = by_type[0]
    url = one["items"][0]["imageUrl"]
    assert url.startswith("http") and url.endswith(".png") and one["items"][0]["type"] == "abstractImage"
    got = c.get(url[url.index("/images/") :])
    assert got.status_code == 200 and got.data[:4] == b"\x89PNG"
    conv = c.get("/refinement/users/p03/stimuli?type=2").get_json()["data"]["stimuli"][0]
    assert conv["result"]["names"] == names["names"] and conv["requestId"] == names["requestId"]
    detail = c.get(f"/refinement/stimuli/{one['id']}").get_json()["data"]
    assert (
        detail["id"] == one["id"] and detail["provenance"]["products"]["template"] == "refinement/zh/products"
    )
    req = c.get(f"/refinement/requests/{rapid['requestId']}").get_json()["data"]
    assert req["status"] == "done" and {s["step"] for s in req["steps"]} >= {"products", "scene_images"}
    sess = c.get(f"/refinement/sessions/{session}").get_json()["data"]
    assert sess["username"] == "p03" and len(sess["requestList"]) == 2
    assert c.get("/refinement/stimuli/" + "0" * 24).status_code == 404
    assert c.get("/refinement/users/p03/stimuli?limit=0").status_code == 422
    assert c.get("/refinement/users/nobody/sessions").get_json()["data"]["sessions"] == []


def test_unknown_session_id_is_404(c: Any) -> None:
    status, env = post(c, "/generate", {**R3, "sessionId": "s_doesnotexist12"})
    assert status == 404 and env["success"] is False


def test_anonymous_without_session(c: Any, db: Any) -> None:
    data = ok(c, "/generate", {"appid": 0, "type": 0, "prompts": {"task": TASK, "num": 1}})
    doc = db.refinement_stimuli.find_one({"request_id": data["requestId"]})
    assert doc["username"] is None and doc["attribution"] == "anonymous"


def test_auth_user_owns_stimuli(make_app: Any, fake_openai: Any, db: Any) -> None:
    from apps.core.auth import create_user

    app = fake_app(make_app, fake_openai, AUTH_MODE="apikey")
    c = app.test_client()
    key_a, key_b = create_user(db, "alice"), create_user(db, "bob")
    assert c.post("/refinement/generate", json=R3).status_code == 401
    start = c.post("/refinement/paint/start", json={"username": "ignored"}, headers={"X-API-Key": key_a})
    assert start.get_json()["data"]["username"] == "alice"
    resp = c.post("/refinement/generate", json={**R3, "username": "bob"}, headers={"X-API-Key": key_a})
    data = resp.get_json()["data"]
    doc = db.refinement_stimuli.find_one({"_id": data["stimulusIds"][0]})
    assert (doc["username"], doc["attribution"]) == ("alice", "auth")
    assert c.get("/refinement/users/alice/stimuli", headers={"X-API-Key": key_a}).get_json()["data"][
        "stimuli"
    ]
    assert c.get("/refinement/users/alice/stimuli", headers={"X-API-Key": key_b}).status_code == 404
    assert c.get(f"/refinement/stimuli/{doc['_id']}", headers={"X-API-Key": key_b}).status_code == 404
    image_id = doc["images"][0]["id"]
    refine = {"imageId": image_id}
    assert c.post("/refinement/refine/img2img", json=refine, headers={"X-API-Key": key_b}).status_code == 404
    assert c.post("/refinement/refine/img2img", json=refine, headers={"X-API-Key": key_a}).status_code == 200


def test_concurrent_paint_start_makes_one_user(app: Any, db: Any) -> None:
    barrier = threading.Barrier(8)
    results: list[Any] = []

    def go() -> None:
        barrier.wait()
        results.append(
            app.test_client().post("/refinement/paint/start", json={"username": "race"}).get_json()
        )

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["success"] for r in results) and len({r["data"]["_id"] for r in results}) == 1
    assert db.refinement_users.count_documents({"username": "race"}) == 1
    assert db.refinement_sessions.count_documents({"username": "race"}) == 8


# ------------------------------------------------------------------ concurrency
def test_duplicate_concurrent_generate_calls_both_succeed(app: Any, fake_openai: Any, db: Any) -> None:
    fake_openai.delay = 0.15
    bodies = [
        R3,
        R3,
        {"appid": 0, "type": 1, "prompts": R4["prompts"]},
        {"appid": 0, "type": 1, "prompts": R4["prompts"]},
    ]
    barrier = threading.Barrier(len(bodies))
    results: list[tuple[int, Any]] = [(0, None)] * len(bodies)

    def go(i: int) -> None:
        barrier.wait()
        resp = app.test_client().post("/refinement/generate", json=bodies[i])
        results[i] = (resp.status_code, resp.get_json())

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _ in results] == [200] * 4, results
    assert [len(r["data"]["result"]) for _, r in results] == [6, 6, 3, 3]
    assert len({r["data"]["requestId"] for _, r in results}) == 4
    assert fake_openai.max_in_flight >= 4  # the four requests really overlapped
    assert db.refinement_stimuli.count_documents({}) == 18


def test_text_steps_run_while_images_generate(
    make_app: Any, fake_openai: Any, fake_sd_fleet: Any, db: Any
) -> None:
    fleet = fake_sd_fleet(2, 0.3)
    app = fake_app(
        make_app, fake_openai, SD_INSTANCES=",".join(f.url for f in fleet), IMAGE_PROVIDER="sdwebui"
    )
    fake_openai.delay = 0.2
    data = ok(app.test_client(), "/generate", {"appid": 0, "type": 0, "prompts": {"task": TASK, "num": 4}})
    steps = {s["step"]: s for s in db.refinement_requests.find_one({"_id": data["requestId"]})["steps"]}
    concept, scenes, images = steps["concept_texts"], steps["scenes"], steps["scene_images"]
    assert concept["started_ms"] < scenes["ended_ms"]  # concept texts overlap the image chain
    assert concept["started_ms"] >= steps["products"]["ended_ms"] - 1
    # all 4 images were submitted at once: both instances worked, 2 waves
    assert sum(len(f.generation_requests()) for f in fleet) == 4
    assert all(len(f.generation_requests()) == 2 for f in fleet)
    assert images["ended_ms"] - images["started_ms"] < 0.3 * 4 * 1000


def test_session_counts_are_kept_on_the_session(c: Any, fake_openai: Any, db: Any) -> None:
    """A new session counts its own requests (done, failed) and stimuli; one from before the counters
    (no `counted`) is counted from the requests and stimuli, and both ways agree."""
    from apps.refinement import store

    session = ok(c, "/paint/start", {"username": "p04"})["sessionId"]
    assert db.refinement_sessions.find_one({"_id": session})["counted"] is True
    ok(c, "/generate", {**R3, "sessionId": session, "prompts": {"task": TASK, "num": 2}})
    fake_openai.fail_next(500, times=40)
    status, _ = post(c, "/generate", {**R3, "sessionId": session, "prompts": {"task": TASK, "num": 2}})
    assert status in (502, 503)
    (row,) = c.get("/refinement/users/p04/sessions").get_json()["data"]["sessions"]
    assert (row["requests"], row["failedRequests"], row["stimuli"]) == (2, 1, 2)
    doc = db.refinement_sessions.find_one({"_id": session})
    assert doc["counts"] == {"done": 1, "failed": 1, "stimuli": 2}
    counted = store.session_counts(db, [doc])
    aggregated = store.session_counts(db, [{k: v for k, v in doc.items() if k != "counted"}])
    assert counted == aggregated == ({session: {"done": 1, "failed": 1}}, {session: 2})
    # a session from before the counters: its counters (were any $inc'ed onto it) are not trusted
    db.refinement_sessions.update_one(
        {"_id": session}, {"$unset": {"counted": 1}, "$set": {"counts.done": 99}}
    )
    (row,) = c.get("/refinement/users/p04/sessions").get_json()["data"]["sessions"]
    assert (row["requests"], row["failedRequests"], row["stimuli"]) == (2, 1, 2)


# ------------------------------------------------------------------ failures leave nothing behind
def test_model_500_exhausted_is_503_and_nothing_saved(c: Any, fake_openai: Any, db: Any) -> None:
    fake_openai.fail_next(500, times=40)
    status, env = post(
        c, "/generate", {"appid": 0, "type": 1, "prompts": {**R4["prompts"], "designImage": canvas_png()}}
    )
    assert status in (502, 503) and env["success"] is False and env["code"] == 2 and env["data"] is None
    assert "language model" in env["message"] and "500" in env["message"]
    assert db.refinement_stimuli.count_documents({}) == 0
    assert refinement_images(db) == []  # the sketch stored for the request is gone too
    (failed,) = list(db.refinement_requests.find())
    assert failed["status"] == "failed" and failed["error"]["type"] == "model" and failed["sketch_ids"] == []
    assert len(fake_openai.chat_requests()) == 4  # 1 try + 3 retries


def test_model_fails_after_images_nothing_saved(c: Any, fake_openai: Any, db: Any) -> None:
    """The concept-text call fails for good while the images are made: the images are deleted."""

    def responder(body: dict[str, Any]) -> Any:
        key = next(iter(body["response_format"]["json_schema"]["schema"]["properties"]))
        if key == "texts":
            raise RuntimeError("boom")  # the fake answers 500
        from tests.fakes.fake_openai import example_for

        return example_for(body["response_format"]["json_schema"]["schema"])

    fake_openai.set_responder(responder)
    status, env = post(c, "/generate", R3)
    assert status in (502, 503) and env["code"] == 2
    assert db.refinement_stimuli.count_documents({}) == 0 and refinement_images(db) == []
    failed = db.refinement_requests.find_one()
    assert failed["status"] == "failed" and any(s["step"] == "scene_images" for s in failed["steps"])


def test_image_failure_is_5xx_and_partial_images_deleted(
    make_app: Any, fake_openai: Any, fake_sd_fleet: Any, db: Any
) -> None:
    good, bad = fake_sd_fleet(2, 0.05)
    app = fake_app(
        make_app,
        fake_openai,
        SD_INSTANCES=f"{good.url},{bad.url}",
        IMAGE_PROVIDER="sdwebui",
        SD_MAX_ATTEMPTS=1,
    )
    bad.empty_images_next(20)
    status, env = post(app.test_client(), "/generate", R3)
    assert status in (502, 503) and env["success"] is False and env["code"] == 2
    assert "image" in env["message"]
    assert len(good.generation_requests()) >= 1  # some images were made, then thrown away
    assert db.refinement_stimuli.count_documents({}) == 0 and refinement_images(db) == []


# ------------------------------------------------------------------ image refinement: version tree
def _mask(size: tuple[int, int]) -> str:
    img = Image.new("L", size, 0)
    for x in range(size[0] // 4, size[0] // 2):
        for y in range(size[1] // 4, size[1] // 2):
            img.putpixel((x, y), 255)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_version_tree_img2img_and_inpaint(
    make_app: Any, fake_openai: Any, fake_sd_fleet: Any, db: Any
) -> None:
    fleet = fake_sd_fleet(2)
    app = fake_app(
        make_app, fake_openai, SD_INSTANCES=",".join(f.url for f in fleet), IMAGE_PROVIDER="sdwebui"
    )
    c = app.test_client()
    session = ok(c, "/paint/start", {"username": "p04"})["sessionId"]
    gen = ok(c, "/generate", {**R6_TWO, "sessionId": session})
    stim = db.refinement_stimuli.find_one({"_id": gen["stimulusIds"][0]})
    scene_id, product_id = (i["id"] for i in stim["images"])
    with Image.open(io.BytesIO(stored_png(app, product_id))) as img:
        size = img.size
    for f in fleet:
        f.reset()

    var = ok(c, "/refine/img2img", {"imageId": product_id, "strength": 0.35, "num": 2, "seed": 7})
    assert var["parentId"] == product_id and var["rootId"] == product_id and len(var["versions"]) == 2
    for v in var["versions"]:
        assert v["op"] == "img2img" and v["parentId"] == product_id and v["depth"] == 1
        assert v["params"]["strength"] == 0.35 and v["stimulusId"] == stim["_id"]
        assert v["prompt"] == stim["images"][1]["positive"]  # the parent's prompt by default
        assert assert_png_b64(v["image"]) == stored_png(app, v["id"])
    sent = [r["json"] for f in fleet for r in f.generation_requests()]
    assert len(sent) == 2 and all(p["denoising_strength"] == 0.35 and p["init_images"] for p in sent)
    assert sorted(p["seed"] for p in sent) == [7, 8]

    child = var["versions"][0]["id"]
    inp = ok(
        c,
        "/refine/inpaint",
        {"imageId": child, "mask": _mask(size), "prompt": "red handle", "invertMask": True},
    )
    (v2,) = inp["versions"]
    assert (
        v2["parentId"] == child and v2["rootId"] == product_id and v2["depth"] == 2 and v2["op"] == "inpaint"
    )
    assert (
        v2["prompt"] == "red handle"
        and v2["params"]["strength"] == 0.75
        and v2["params"]["invert_mask"] is True
    )
    inpaint_payload = [r["json"] for f in fleet for r in f.generation_requests() if r["json"].get("mask")]
    assert len(inpaint_payload) == 1 and inpaint_payload[0]["inpainting_mask_invert"] == 1
    mask_doc = db["images.files"].find_one({"_id": v2["params"]["mask_image_id"]})
    assert mask_doc["metadata"]["kind"] == "mask"

    tree = c.get(f"/refinement/refine/tree/{v2['id']}").get_json()["data"]  # from a leaf: the whole tree
    assert tree["id"] == product_id and tree["op"] == "original" and tree["parentId"] is None
    assert sorted(ch["id"] for ch in tree["children"]) == sorted(v["id"] for v in var["versions"])
    grand = next(ch for ch in tree["children"] if ch["id"] == child)["children"]
    assert [g["id"] for g in grand] == [v2["id"]] and grand[0]["children"] == []
    assert tree["children"][0]["imageUrl"].endswith(".png") and tree["children"][0]["image"] is None
    other = c.get(f"/refinement/refine/tree/{scene_id}").get_json()["data"]
    assert other["id"] == scene_id and other["children"] == []
    versions = list(db.refinement_versions.find())
    assert len(versions) == 3 and all(v["username"] == "p04" and v["session"] == session for v in versions)


def test_refine_validation(c: Any, db: Any) -> None:
    gen = ok(c, "/generate", {"appid": 0, "type": 0, "prompts": {"task": TASK, "num": 1}})
    image_id = db.refinement_stimuli.find_one({"_id": gen["stimulusIds"][0]})["images"][0]["id"]
    status, env = post(c, "/refine/img2img", {"imageId": image_id, "strength": 1.5})
    assert status == 422 and "strength" in env["message"]
    status, env = post(c, "/refine/inpaint", {"imageId": image_id, "mask": _mask((10, 10))})
    assert status == 422 and "mask is 10x10" in env["message"]
    status, env = post(c, "/refine/inpaint", {"imageId": image_id, "mask": "bm90IGFuIGltYWdl"})
    assert status in (415, 422) and "mask" in env["message"]
    status, env = post(c, "/refine/img2img", {"imageId": "x" * 24})
    assert status == 404 and env["success"] is False
    assert c.get("/refinement/refine/tree/" + "y" * 24).status_code == 404
    assert db.refinement_versions.count_documents({}) == 0
    # placeholder provider: img2img works offline too
    got = ok(c, "/refine/img2img", {"imageId": image_id})
    assert got["versions"][0]["params"]["strength"] == 0.6


def test_sd_options_are_reread_when_the_file_changes_and_a_bad_file_is_a_settings_error(
    tmp_path: Any,
) -> None:
    import os

    from agent.prompts import PromptLibrary
    from apps.core.errors import ApiError
    from apps.refinement.images import sd_options

    lib = PromptLibrary(tmp_path)
    assert sd_options(lib, "inpaint")["denoising_strength"] == 0.75  # no file: the defaults
    path = tmp_path / "refinement" / "sd_options.yaml"
    path.parent.mkdir()
    path.write_text("scene: {width: 512, height: 512}\n", encoding="utf-8")
    assert (sd_options(lib, "scene")["width"], sd_options(lib, "scene")["steps"]) == (512, 30)
    path.write_text("scene: {width: 768}\n", encoding="utf-8")
    os.utime(path, ns=(1, 1))  # a different signature even within the clock's resolution
    assert sd_options(lib, "scene")["width"] == 768
    path.write_text("scene: {colour: red}\n", encoding="utf-8")
    with pytest.raises(ApiError, match="bad entry 'scene'"):
        sd_options(lib, "scene")
