"""Client dicts stored as sent (ideation /timeRecord and /paint/save, refinement /paint/save): a key
MongoDB cannot store (NUL byte, leading "$", ".") is a 422 in the app's envelope and nothing is
written, instead of a bson/MongoDB error at the write (a 500)."""

from __future__ import annotations

from typing import Any

import pytest

from apps.core.mongo_keys import find_bad_key

BAD_KEYS = ["a\u0000b", "$where", "a.b"]
ENVELOPE_KEYS = {"success", "code", "message", "data"}


def assert_rejected(resp: Any) -> str:
    env = resp.get_json()
    assert resp.status_code == 422, (resp.status_code, env)
    assert set(env) == ENVELOPE_KEYS and env["success"] is False and env["code"] == 1 and env["data"] is None
    assert "cannot be stored" in env["message"], env
    return env["message"]


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize("where", ["top", "records", "entry"])
def test_ideation_time_record_rejects_unstorable_keys(
    client: Any, openai_app: Any, key: str, where: str
) -> None:
    body: dict[str, Any] = {"username": "10", "stageSwitchRecords": {"准备": [{"startTime": 1}]}}
    if where == "top":
        body[key] = 1  # extra keys are stored too
    elif where == "records":
        body["aiStageSwitchRecords"] = {key: [{"startTime": 1}]}
    else:
        body["stageSwitchRecords"]["准备"][0][key] = 1
    message = assert_rejected(client.post("/ideation/timeRecord", json=body))
    assert repr(key)[1:-1] in message  # names the offending key
    assert openai_app.extensions["services"].db.ideation_time_records.count_documents({}) == 0
    # the same body without the bad key is stored
    ok = client.post(
        "/ideation/timeRecord", json={"username": "10", "stageSwitchRecords": {"准备": [{"startTime": 1}]}}
    )
    assert ok.status_code == 200 and ok.get_json()["success"] is True


@pytest.mark.parametrize("key", BAD_KEYS)
def test_ideation_paint_save_rejects_unstorable_keys(client: Any, openai_app: Any, key: str) -> None:
    assert client.post("/ideation/paint/start", json={"username": "10"}).get_json()["success"]
    scheme = {"name": "", "paths": [], "texts": [{"text": "x", "position": {"x": 1, key: 2}}]}
    data = {"designSchemes": {"草图的环境": [scheme]}, "designTask": "changed"}
    assert_rejected(client.post("/ideation/paint/save", json={"username": "10", "data": data}))
    doc = openai_app.extensions["services"].db.ideation_users.find_one({"username": "10"})
    assert doc["sketchSchemes"] == [] and doc["designTask"] == "" and "saved_at" not in doc


@pytest.mark.parametrize("key", BAD_KEYS)
def test_refinement_paint_save_rejects_unstorable_keys(client: Any, openai_app: Any, key: str) -> None:
    assert client.post("/refinement/paint/start", json={"username": "p01"}).get_json()["success"]
    scheme = {"name": "", "paths": [{"paths": [{"x": 1, "y": 2}], key: True}], "texts": []}
    data = {"designSchemes": {"快速发散": [scheme]}, "designTask": "changed"}
    assert_rejected(client.post("/refinement/paint/save", json={"username": "p01", "data": data}))
    db = openai_app.extensions["services"].db
    assert db.refinement_users.find_one({"username": "p01"})["rapidDivergenceSchemes"] == []
    assert db.refinement_saves.count_documents({}) == 0


def test_find_bad_key_walks_deep_and_allows_ordinary_keys() -> None:
    deep: Any = {"ok": 1}
    for _ in range(5000):  # deeper than the recursion limit
        deep = {"k": [deep]}
    assert find_bad_key(deep) is None
    deep["k"][0]["$x"] = 1
    assert find_bad_key(deep) == ("k[0].$x", "must not start with '$'")
    assert find_bad_key({"设计摘要的环境": [{"startTime": 1, "a$": 2, "": 3}]}) is None
