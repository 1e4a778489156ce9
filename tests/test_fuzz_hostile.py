"""Hostile bodies on every POST route in /openapi.json: never a 5xx, always JSON, nothing written when refused.

For each route a valid-ish body is built from its schema (required fields, patterns honoured),
then spoiled one class at a time: 10,000-deep nesting (whole body and inside a field), lone
surrogates, NUL bytes, MongoDB operator and dotted keys, huge strings and numbers (1e400, 2**70),
wrong types, and a decompression bomb wherever a field or upload takes an image. A refused
request (4xx) must leave every collection as it was; accepted ones may write (their background
jobs are awaited so they cannot be mistaken for writes of the next request).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from PIL import Image

from tests.client_facing_app import client_facing_app
from tests.test_hostile import counts, png, png_bomb

DEEP = 10_000
# streams would hold the response open; the routes are GET anyway, this is only a guard
SKIP = re.compile(r"(/events$|/stream$|/ws$)")
IMAGE_FIELD = re.compile(r"(image|mask|canvas|sketch|records)", re.IGNORECASE)


@pytest.fixture(scope="module")
def hostile_app(mongo_client: Any, mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with client_facing_app(
        mongo_client, mongo_uri, tmp_path_factory.mktemp("hostile"), "hostile", STORYBOOK_MAX_PAGES=2
    ) as app:
        yield app


def post_routes(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path, ops in spec["paths"].items():
        if "post" in ops and not SKIP.search(path):
            out.append((path, ops["post"]))
    return out


def fill_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "abcdefgh12345678abcdefgh", path)


def body_schema(op: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    content = (op.get("requestBody") or {}).get("content") or {}
    for mime in ("application/json", "multipart/form-data"):
        if mime in content:
            return mime, content[mime].get("schema")
    return None, None


# ------------------------------------------------------------------ a valid-ish body per route

_CANDIDATES = ("abcdefgh12345678abcdefgh", "alice", "fake", "1", "a", "x" * 8)
# bodies a route's schema cannot express (validators, cross-field rules, app state); merged over the minimal one
KNOWN: dict[str, dict[str, Any]] = {
    "/ideation/generate": {
        "username": "fuzz",
        "designTask": "a drone",
        "currentNum": 1,
        "currentStage": "草图的环境",
        "selectedTexts": ["wing"],
        "selectedCanvasRecords": [],
        "selectedButtonInfo": {"buttonText": "转换为草图", "aiStage": "草图的辅助生成"},
    },
    "/refinement/generate": {
        "appid": 0,
        "type": 1,
        "prompts": {"designTexts": ["wing"], "schemeId": 1},
        "username": "fuzz",
    },
    "/ideation/paint/start": {"username": "fuzz"},
    "/ideation/paint/save": {"username": "fuzz", "data": {"designTask": "a drone", "designSchemes": {}}},
    "/refinement/paint/start": {"username": "fuzz"},
    "/refinement/paint/save": {"username": "fuzz", "data": {"designTask": "a drone"}},
    "/storyteller/api/rewrite": {"start": 0, "end": 4},
    "/storybook/books": {"description": "a fox", "pages": 1},
    "/storyteller/setstory/": {"genre": "Adventure", "registro": "Casual"},
    "/storyteller/savestory/": {"genre": "Adventure", "registro": "Casual", "story": "Once upon a time."},
    "/storyteller/api/settings": {"genre": "Adventure", "registro": "Casual"},
}


def _resolve(schema: Any, spec: dict[str, Any]) -> Any:
    while isinstance(schema, dict) and "$ref" in schema:
        node: Any = spec
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def minimal(schema: Any, spec: dict[str, Any], depth: int = 0) -> Any:
    """The smallest value the schema accepts (required fields only; `pattern` honoured by trying candidates)."""
    schema = _resolve(schema, spec)
    if not isinstance(schema, dict) or depth > 12:
        return "fake"
    for combo in ("anyOf", "oneOf"):
        if combo in schema:
            options = [o for o in schema[combo] if _resolve(o, spec).get("type") != "null"] or schema[combo]
            return minimal(options[0], spec, depth + 1)
    if "allOf" in schema:
        return minimal(schema["allOf"][0], spec, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type") or ("object" if "properties" in schema else "string")
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: minimal(props.get(k, {}), spec, depth + 1) for k in schema.get("required", [])}
    if kind == "array":
        n = max(schema.get("minItems", 1), 1)
        return [
            minimal(schema.get("items", {}), spec, depth + 1)
            for _ in range(min(n, schema.get("maxItems", n)))
        ]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1)
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return False
    pattern = schema.get("pattern")
    for candidate in _CANDIDATES:
        text = candidate.ljust(schema.get("minLength", 0), "x")[: schema.get("maxLength", 10**6)]
        if pattern is None or re.search(pattern, text):
            return text
    return "fake"


def valid_body(path: str, schema: Any, spec: dict[str, Any], known: dict[str, dict[str, Any]]) -> Any:
    body = minimal(schema, spec) if schema else {}
    if isinstance(body, dict):
        body.update(copy.deepcopy(known.get(path, {})))
    return body


def seed_refinement(c: Any, db: Any) -> dict[str, dict[str, Any]]:
    """A stimulus image to refine, so the refine routes (and their mask input) get past the 404."""
    resp = c.post(
        "/refinement/generate", json={"appid": 0, "type": 0, "prompts": {"task": "a drone", "num": 1}}
    )
    assert resp.status_code == 200, resp.get_json()
    stim = db.refinement_stimuli.find_one({"_id": resp.get_json()["data"]["stimulusIds"][0]})
    image_id = stim["images"][0]["id"]
    with Image.open(io.BytesIO(hostile_store(db).load(image_id))) as img:
        size = img.size
    buf = io.BytesIO()
    Image.new("L", size, 255).save(buf, format="PNG")
    mask = base64.b64encode(buf.getvalue()).decode()
    return {
        "/refinement/refine/img2img": {"imageId": image_id},
        "/refinement/refine/inpaint": {"imageId": image_id, "mask": mask},
    }


def hostile_store(db: Any) -> Any:
    from apps.core.storage import ImageStore

    return ImageStore(db, max_bytes=50 << 20, max_side=8192, cache_bytes=0)


# ------------------------------------------------------------------ spoilers


def map_strings(value: Any, fn: Callable[[str, str], Any], key: str = "") -> Any:
    if isinstance(value, str):
        return fn(key, value)
    if isinstance(value, dict):
        return {k: map_strings(v, fn, k) for k, v in value.items()}
    if isinstance(value, list):
        return [map_strings(v, fn, key) for v in value]
    return value


def map_numbers(value: Any, new: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return new
    if isinstance(value, dict):
        return {k: map_numbers(v, new) for k, v in value.items()}
    if isinstance(value, list):
        return [map_numbers(v, new) for v in value]
    return value


def first_field(value: Any) -> str | None:
    return next(iter(value), None) if isinstance(value, dict) and value else None


def json_variants(valid: Any) -> Iterator[tuple[str, str]]:
    """(name, raw JSON text) of every hostile variant of a valid-ish body."""
    yield "deep body", "[" * DEEP + "]" * DEEP
    yield "deep object body", '{"a":' * DEEP + "1" + "}" * DEEP
    field = first_field(valid)
    if field is not None:
        rest = json.dumps({k: v for k, v in valid.items() if k != field})[1:]
        yield (
            "deep field",
            '{"' + field + '":' + "[" * DEEP + "]" * DEEP + ("," + rest if rest != "}" else "}"),
        )
    yield "surrogates", json.dumps(map_strings(valid, lambda k, v: v + "\ud800"))
    yield "surrogate key", json.dumps({**valid, "\udc00": "x"} if isinstance(valid, dict) else valid)
    yield "nul", json.dumps(map_strings(valid, lambda k, v: v + "\x00x"))
    if isinstance(valid, dict):
        yield "operator keys", json.dumps({**valid, "$where": "1", "a.b": 1, "x\x00y": 2})
        yield (
            "operator values",
            json.dumps({k: {"$gt": ""} if isinstance(v, (dict, str)) else v for k, v in valid.items()}),
        )
    yield "huge strings", json.dumps(map_strings(valid, lambda k, v: "x" * 300_000))
    yield "1e400", json.dumps(map_numbers(valid, 0.5)).replace("0.5", "1e400")
    yield "2**70", json.dumps(map_numbers(valid, 2**70))
    yield "-2**70", json.dumps(map_numbers(valid, -(2**70)))
    yield "wrong types: array", "[]"
    yield "wrong types: string", '"x"'
    yield "wrong types: number", "123"
    yield "wrong types: null", "null"
    if isinstance(valid, dict):
        yield (
            "wrong types: fields",
            json.dumps({k: ([] if not isinstance(v, list) else {}) for k, v in valid.items()}),
        )
    bomb = "data:image/png;base64," + base64.b64encode(png_bomb()).decode()
    bombed = map_strings(valid, lambda k, v: bomb if IMAGE_FIELD.search(k) else v)
    if bombed != valid:
        yield "image bomb", json.dumps(bombed)
    yield "bomb everywhere", json.dumps(map_strings(valid, lambda k, v: bomb))


def wait_jobs(db: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while db.jobs.count_documents({"status": {"$in": ["queued", "working"]}}):
        assert time.monotonic() < deadline, "a background job did not end"
        time.sleep(0.05)


def test_every_post_route_survives_hostile_bodies(hostile_app: Any) -> None:
    c = hostile_app.test_client()
    db = hostile_app.extensions["services"].db
    spec = c.get("/openapi.json").get_json()
    routes = post_routes(spec)
    assert len(routes) >= 20, [p for p, _ in routes]
    known = {**KNOWN, **seed_refinement(c, db)}
    started = time.monotonic()
    failures: list[str] = []
    tried = 0
    statuses: dict[str, list[int]] = {}

    def check(label: str, send: Callable[[], Any]) -> None:
        nonlocal tried
        tried += 1
        wait_jobs(db)
        before = counts(db)
        resp = send()
        status = resp.status_code
        statuses.setdefault(label.rsplit("[", 1)[1].rstrip("]"), []).append(status)
        if os.environ.get("FUZZ_VERBOSE") and label.endswith("[valid]"):
            print(label, status, resp.get_data(as_text=True)[:160])
        text = resp.get_data(as_text=True)[:200]
        if status >= 500:
            failures.append(f"{label}: {status} {text}")
        elif status >= 400:
            if not resp.is_json:
                failures.append(f"{label}: {status} is not JSON: {text}")
            else:
                wait_jobs(db)
                after = counts(db)
                if after != before:
                    changed = {
                        k: (before.get(k), after.get(k)) for k in after if before.get(k) != after.get(k)
                    }
                    failures.append(f"{label}: refused ({status}) but wrote {changed}")
        resp.close()

    for path, op in routes:
        url = fill_path(path)
        mime, schema = body_schema(op)
        if mime == "multipart/form-data" or path.endswith(("/upload", "/uploadImage")):
            for name, data in (
                ("bomb upload", png_bomb()),
                ("garbage upload", b"\x89PNG\r\n\x1a\nnot"),
                ("surrogate form", png()),
            ):
                form: dict[str, Any] = {"file": (io.BytesIO(data), "x.png", "image/png")}
                if name == "surrogate form":
                    form["username"] = '"\\ud800"'
                check(
                    f"POST {path} [{name}]",
                    lambda form=form, url=url: c.post(url, data=form, content_type="multipart/form-data"),
                )
            if mime == "multipart/form-data":
                continue
        valid = valid_body(path, schema, spec, known)
        check(f"POST {path} [valid]", lambda valid=valid, url=url: c.post(url, json=valid))
        for name, raw in json_variants(valid):
            check(
                f"POST {path} [{name}]",
                lambda raw=raw, url=url: c.post(url, data=raw, content_type="application/json"),
            )
    elapsed = time.monotonic() - started
    if os.environ.get("FUZZ_VERBOSE"):
        for name, got in statuses.items():
            print(name, sorted(set(got)), sum(1 for s in got if s < 300), "accepted")
    assert not failures, f"{len(failures)} of {tried} hostile requests broke a promise:\n" + "\n".join(
        failures
    )
    assert elapsed < 120, f"the hostile fuzz took {elapsed:.0f} s"
