"""What `/openapi.json` says beyond the pydantic models: security, streams, non-JSON bodies.

Routes declare, at the source, which operations need credentials (`security=PROTECTED`, or
`STREAM_PROTECTED` where a `?token=` also works) and what their streams carry (`sse(Model, ...)`).
Which schemes exist depends on the running app's AUTH_MODE, known only when the app is built, so
`init_openapi` adjusts the generated document once per app: it keeps the schemes of that mode (basic;
or X-API-Key and bearer; plus the stream token) and the matching per-operation requirements, adds a
401 answer to protected operations, and puts the models that only streams use into `components`.
With AUTH_MODE=none nothing is protected and the document declares no scheme.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

REF = "#/components/schemas/{model}"

# alternatives: any one of them authenticates (the document keeps those of the running AUTH_MODE)
PROTECTED: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}, {"basic": []}]
STREAM_PROTECTED: list[dict[str, list[str]]] = [*PROTECTED, {"streamToken": []}]
SCHEMES_BY_MODE: dict[str, set[str]] = {
    "none": set(),
    "basic": {"basic", "streamToken"},
    "apikey": {"apiKey", "bearer", "streamToken"},
}

_STREAM_MODELS: dict[str, type[BaseModel]] = {}


def _name(model: type[BaseModel]) -> str:
    return str(model.model_json_schema(ref_template=REF).get("title") or model.__name__)


def sse(model: type[BaseModel], description: str) -> dict[str, Any]:
    """A `responses` entry for a Server-Sent Events stream whose messages' `data` is `model` (JSON)."""
    _STREAM_MODELS[_name(model)] = model
    return {
        "description": description,
        "content": {"text/event-stream": {"schema": {"$ref": REF.format(model=_name(model))}}},
    }


def document_model(model: type[BaseModel]) -> str:
    """Put a model into `components` although no operation body/response names it (WebSocket messages)."""
    _STREAM_MODELS[_name(model)] = model
    return REF.format(model=_name(model))


def raw(media_type: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `responses` entry for a non-JSON body (an image, the HTML page, plain text)."""
    return {"description": description, "content": {media_type: {"schema": schema or {"type": "string"}}}}


def body_example(example: dict[str, Any]) -> dict[str, Any]:
    """ConfigDict entries for a request body's example: in the JSON schema (`examples`, for pydantic and
    JSON Schema tools) and on the OpenAPI media type (`example`, which Swagger's "Try it out" fills in;
    flask-openapi3's schema objects keep only the singular `example`)."""
    return {"json_schema_extra": {"examples": [example]}, "openapi_extra": {"example": example}}


def _components(models: dict[str, type[BaseModel]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, model in models.items():
        schema = copy.deepcopy(model.model_json_schema(ref_template=REF, mode="serialization"))
        out.update(schema.pop("$defs", {}))
        out[name] = schema
    return out


API_GUIDE = """\
Four creativity apps behind one server: storybook (Rotate-Calvary), ideation (StepIdeator), refinement
(InsPilot/Refinity), storyteller (StorAIteller). Each app is under its prefix; `ROOT_APP` also mounts one at `/`
(settings per original frontend: docs/frontends.md in the repository; this guide: docs/api.md).

**Auth** (`AUTH_MODE`): none; `basic` (HTTP Basic); `apikey` (`X-API-Key: <key>` or `Authorization: Bearer
<key>`). Use "Authorize" above. Browsers cannot send headers with EventSource/WebSocket: get a `?token=` from
`POST /auth/stream-token {job_id}` (job and storybook streams) or `POST /storyteller/api/stream-token {session}`
(that storyteller session's `stream` and `ws`); a token opens only the streams it was made for.

**Errors**: JSON `{"error": {status, code, message}, "detail": [...]}` (422: FastAPI-style `detail[].loc`);
ideation and refinement answer the originals' envelope `{success, code, message, data}` (business failures are
HTTP 200 with `success: false`); storybook's 401 is `{"detail": ...}`.

**SSE** (`text/event-stream`; each operation names the schema of its messages' `data`): `GET /jobs/{id}/events`
and `GET /storybook/books/{id}/events` (JobEvent / BookEvent; `event:` = type, `id:` = sequence, resumable with
`Last-Event-ID`, `: ping` heartbeats, ending with `done` | `failed` | `cancelled`); `GET
/storybook/get_updates/{task_id}` (LegacySnapshot, the original's cumulative snapshots via `onmessage`); `GET
/storyteller/stream` (StoryStreamEvent: `delta`..., then `done` | `cancelled` | `error`).

**WebSocket** `/storyteller/ws?session=S&action=next|story&format=text|json[&token=T]`: `format=json` sends
StoryStreamEvent frames (`start`, `delta`..., `done` | `cancelled` | `error`); the default (the original) sends
raw text deltas and closes 1000 when done, 1011 + reason on error. Send CancelMessage `{"type": "cancel"}` (or
`cancel`) to stop.
"""


def adjust_spec(spec: dict[str, Any], auth_mode: str) -> dict[str, Any]:
    """The generated document for this AUTH_MODE (see the module docstring); changes `spec` in place."""
    keep = SCHEMES_BY_MODE.get(auth_mode, set())
    spec.setdefault("info", {})["description"] = API_GUIDE
    components = spec.setdefault("components", {})
    schemes = components.get("securitySchemes") or {}
    components["securitySchemes"] = {k: v for k, v in schemes.items() if k in keep}
    schemas = components.setdefault("schemas", {})
    for name, schema in _components(_STREAM_MODELS).items():
        schemas.setdefault(name, schema)
    for item in spec.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            security = [req for req in operation.pop("security", None) or [] if set(req) <= keep]
            if not keep or not any(security):  # auth off, or only the "no credentials" alternative left
                continue
            operation["security"] = security
            operation["responses"].setdefault(
                "401",
                {
                    "description": "Missing or wrong credentials",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
            )
    return spec


def init_openapi(app: Any, auth_mode: str) -> None:
    """Adjust the document when flask-openapi3 first builds it (lazily; it is cached per app)."""
    generate = app.generate_spec_json

    def generate_adjusted() -> None:
        generate()
        adjust_spec(app.spec_json, auth_mode)

    app.generate_spec_json = generate_adjusted
