"""`/openapi.json` is enough to integrate (issue 17 items 6-8): unique component names per app, security
following AUTH_MODE, 2xx schemas, request examples that validate and that the routes accept, and
replies that match their documented schemas."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import typing
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

import apps

REF = "#/components/schemas/{model}"
METHODS = ("get", "post", "put", "patch", "delete")
# path values that pass each parameter's pattern and name nothing that exists
CANDIDATES = ["abcdefgh12345678", "0123456789abcdef01234567", "Xk3v9QeL0aBcDeFgHiJkLmNo", "123456789"]


def fill_path(path: str, op: dict[str, Any]) -> str:
    schemas = {p["name"]: p.get("schema", {}) for p in op.get("parameters", []) if p.get("in") == "path"}

    def value(match: re.Match[str]) -> str:
        schema = schemas.get(match.group(1), {})
        for candidate in CANDIDATES:
            typed: Any = int(candidate) if schema.get("type") == "integer" else candidate
            if jsonschema.Draft202012Validator(schema).is_valid(typed):
                return candidate
        raise AssertionError(f"no dummy value for {match.group(1)} in {path}")

    return re.sub(r"{([^}]+)}", value, path)


def doc_of(app: Any) -> dict[str, Any]:
    resp = app.test_client().get("/openapi.json")
    assert resp.status_code == 200
    return resp.get_json()


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, m, op) for path, item in doc["paths"].items() for m, op in item.items() if m in METHODS]


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator whose `#/components/...` references resolve inside the document."""
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def body_models(app: Any) -> dict[tuple[str, str], type[BaseModel]]:
    """(OpenAPI path, method) -> the pydantic model the view validates its JSON body with."""
    out: dict[tuple[str, str], type[BaseModel]] = {}
    for rule in app.url_map.iter_rules():
        view = inspect.unwrap(app.view_functions[rule.endpoint])
        try:
            hints = typing.get_type_hints(view)
        except (NameError, TypeError):
            continue
        model = hints.get("body")
        if isinstance(model, type) and issubclass(model, BaseModel):
            path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
            for method in rule.methods or ():
                out[(path, method.lower())] = model
    return out


def _props(schema: dict[str, Any]) -> tuple[set[str], set[str]]:
    return set(schema.get("properties", {})), set(schema.get("required", []))


@pytest.fixture
def app(make_app: Any, fake_openai: Any) -> Any:
    return make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        LLM_MODEL="fake-model",
        IMAGE_PROVIDER="placeholder",
        RATE_LIMIT_ENABLED=False,
    )


# ------------------------------------------------------------------ item 6: names


def test_every_request_body_ref_is_its_own_apps_model(app: Any) -> None:
    doc = doc_of(app)
    models = body_models(app)
    checked = 0
    for path, method, op in operations(doc):
        content = op.get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            continue
        model = models[(path, method)]
        owner = path.strip("/").split("/", 1)[0]
        module_app = model.__module__.split(".")[1]
        assert module_app == {"auth": "core"}.get(owner, owner), (path, model)
        own = model.model_json_schema(ref_template=REF)
        component = resolve(doc, content["application/json"]["schema"])
        assert _props(component) == _props(own), (path, method, model)
        for name, nested in own.get("$defs", {}).items():  # nested models resolve to their own shape too
            assert _props(doc["components"]["schemas"][name]) == _props(nested), (path, name)
        checked += 1
    assert checked >= 20


def test_no_two_models_share_a_component_name(app: Any) -> None:
    """Every model any app defines that becomes a component: one name, one shape (a collision silently
    replaces a schema in the document)."""
    components = set(doc_of(app)["components"]["schemas"])
    seen: dict[str, tuple[str, tuple[set[str], set[str]]]] = {}
    for info in pkgutil.walk_packages(apps.__path__, "apps."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                not issubclass(cls, BaseModel)
                or cls.__module__ != module.__name__
                or cls.__name__.startswith("_")
            ):
                continue
            try:
                schema = cls.model_json_schema(ref_template=REF, mode="serialization")
            except Exception:  # noqa: BLE001 - a model that cannot be documented is not in the document
                continue
            named = {str(schema.get("title") or cls.__name__): schema, **schema.get("$defs", {})}
            for name, sub in named.items():
                if name not in components:  # query and path models become parameters, not components
                    continue
                shape = _props(sub)
                where = f"{cls.__module__}.{cls.__name__}"
                if name in seen and seen[name][1] != shape:
                    pytest.fail(f"component {name!r}: {seen[name][0]} and {where} differ")
                seen.setdefault(name, (where, shape))


# ------------------------------------------------------------------ item 7: security


@pytest.mark.parametrize(
    ("mode", "schemes"),
    [("none", set()), ("apikey", {"apiKey", "bearer", "streamToken"}), ("basic", {"basic", "streamToken"})],
)
def test_security_schemes_follow_auth_mode(
    make_app: Any, fake_openai: Any, mode: str, schemes: set[str]
) -> None:
    extra = {"BASIC_AUTH_USERNAME": "u", "BASIC_AUTH_PASSWORD": "p"} if mode == "basic" else {}
    app = make_app(LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, AUTH_MODE=mode, **extra)
    doc = doc_of(app)
    declared = doc["components"].get("securitySchemes", {})
    assert set(declared) == schemes
    if mode == "apikey":
        assert declared["apiKey"] == {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "AUTH_MODE=apikey",
        }
    protected = [(p, m) for p, m, op in operations(doc) if op.get("security")]
    if mode == "none":
        assert protected == []
        return
    assert len(protected) >= 35
    for path, method, op in operations(doc):
        for requirement in op.get("security", []):
            assert set(requirement) <= schemes, (path, method, requirement)
        if op.get("security"):
            assert "401" in op["responses"], (path, method)
    assert not any(op.get("security") for p, _, op in operations(doc) if p in ("/health", "/storyboo/"))


def test_declared_security_matches_the_routes(make_app: Any, fake_openai: Any) -> None:
    """apikey: every operation that requires credentials (no `{}` alternative) refuses a call without them."""
    app = make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        AUTH_MODE="apikey",
        IMAGE_PROVIDER="placeholder",
        RATE_LIMIT_ENABLED=False,
    )
    doc = doc_of(app)
    c = app.test_client()
    checked = 0
    for path, method, op in operations(doc):
        security = op.get("security") or []
        if (
            not security
            or {} in security
            or "multipart/form-data" in op.get("requestBody", {}).get("content", {})
        ):
            continue
        url = fill_path(path, op)
        body = None
        content = op.get("requestBody", {}).get("content", {}).get("application/json")
        if content:
            body = content["example"]
        resp = c.open(url, method=method.upper(), json=body)
        # credentials are checked before any lookup, so a dummy id gets 401 too (not 404)
        assert resp.status_code == 401, (method, path, resp.status_code, resp.get_data(as_text=True)[:200])
        checked += 1
    assert checked >= 30


# ------------------------------------------------------------------ item 8: responses and examples


def test_at_least_90_percent_of_operations_document_a_2xx_schema(app: Any) -> None:
    ops = operations(doc_of(app))
    with_schema = [
        (p, m)
        for p, m, op in ops
        if any(
            code.startswith("2") and any(mt.get("schema") for mt in r.get("content", {}).values())
            for code, r in op["responses"].items()
        )
    ]
    assert len(ops) >= 45
    assert len(with_schema) / len(ops) >= 0.9, sorted(set((p, m) for p, m, _ in ops) - set(with_schema))


def test_sse_streams_and_websocket_messages_are_documented(app: Any) -> None:
    doc = doc_of(app)
    schemas = doc["components"]["schemas"]
    for path in (
        "/jobs/{job_id}/events",
        "/storybook/books/{book_id}/events",
        "/storybook/get_updates/{task_id}",
        "/storyteller/stream",
    ):
        content = doc["paths"][path]["get"]["responses"]["200"]["content"]
        ref = content["text/event-stream"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert ref in schemas and schemas[ref].get("description"), path
    assert schemas["StoryStreamEvent"]["properties"]["type"]["enum"] == [
        "start",
        "delta",
        "done",
        "cancelled",
        "error",
    ]
    assert "CancelMessage" in schemas
    assert "/storyteller/ws" in doc["paths"]["/storyteller/stream"]["get"]["description"]
    assert "WebSocket" in doc["info"]["description"] and "SSE" in doc["info"]["description"]


def test_enums_are_enums(app: Any) -> None:
    doc = doc_of(app)
    params = {p["name"]: p["schema"] for p in doc["paths"]["/storyteller/stream"]["get"]["parameters"]}
    assert params["action"]["enum"] == ["next", "story"] and params["format"]["enum"] == ["text", "json"]
    books = {p["name"]: p["schema"] for p in doc["paths"]["/storybook/books"]["get"]["parameters"]}
    assert "queued" in str(books["status"])
    assert doc["components"]["schemas"]["JobOut"]["properties"]["status"]["enum"][0] == "queued"


def test_every_request_body_has_examples_that_validate_and_are_accepted(app: Any) -> None:
    """Each example: valid against its schema (jsonschema), accepted by its model, and by its route
    (not 422); a 2xx JSON reply also matches the documented 2xx schema."""
    doc = doc_of(app)
    models = body_models(app)
    c = app.test_client()
    bodies = replies = 0
    for path, method, op in operations(doc):
        content = op.get("requestBody", {}).get("content", {})
        if not content:
            continue
        bodies += 1
        if "multipart/form-data" in content:  # a file: documented by its schema (binary) and field examples
            props = content["multipart/form-data"]["schema"]["properties"]
            assert props["file"]["format"] == "binary" and props["username"]["example"], path
            continue
        schema = content["application/json"]["schema"]
        example = content["application/json"].get("example")
        assert example is not None, f"{method} {path}: no example"
        assert models[(path, method)].model_json_schema()["examples"] == [example]  # the same in the schema
        validator(doc, schema).validate(example)
        models[(path, method)].model_validate(example)
        url = fill_path(path, op)
        resp = c.open(url, method=method.upper(), json=example)
        assert resp.status_code != 422 and resp.status_code < 500, (
            path,
            resp.get_data(as_text=True)[:300],
        )
        code = str(resp.status_code)
        documented = op["responses"].get(code, {}).get("content", {}).get("application/json")
        if code.startswith("2") and documented and resp.is_json:
            validator(doc, documented["schema"]).validate(resp.get_json())
            replies += 1
    assert bodies >= 22 and replies >= 10, (bodies, replies)
