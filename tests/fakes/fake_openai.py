"""A fake OpenAI-compatible server: chat completions (incl. SSE streaming), the Azure deployment
paths, moderations, image generations and models. Real HTTP on 127.0.0.1, scriptable, with faults.

    with FakeOpenAI() as fake:
        fake.script("hello", {"title": "A"}, lambda req: "computed")   # next chat replies, in order
        fake.fail_next(429, retry_after=1)                             # then the next call fails
        client = openai.OpenAI(base_url=fake.url, api_key="k")
        azure = openai.AzureOpenAI(azure_endpoint=fake.base, api_key="k", api_version="2024-10-21")

With nothing scripted, chat answers with a JSON value that validates against the request's
schema (response_format json_schema, or `schema` next to json_object), else with
"Fake reply to: <first 40 chars of the last user message>".
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, request

from . import LocalServer, abort_socket
from .pngs import png_bytes

Reply = Any  # str | dict | list | Callable[[dict], str | dict | list]
Responder = Callable[[dict[str, Any]], Any]

MODEL_KINDS = ("chat", "moderations", "images")  # what fail_next/hang_next hit unless told otherwise
MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef"
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_PIECE = re.compile(rf"\s*(?:[{_CJK}]|[^\s{_CJK}]+)")


# ---------------------------------------------------------------- schema-driven example values

_DEEP = 8  # nesting depth after which optional parts are left out (recursive schemas terminate)


def example_for(schema: Any, root: Any = None, key: str = "value", index: int = 0, depth: int = 0) -> Any:
    """A small deterministic value that validates against `schema` (JSON Schema, the usual subset).

    Handles $ref/$defs, allOf/anyOf/oneOf, const/enum, type lists, objects (every property,
    required first; minProperties), arrays (minItems or 1, capped by maxItems; prefixItems;
    uniqueItems via `index`), strings (minLength/maxLength, common formats), integers/numbers
    (minimum/maximum, exclusive bounds, multipleOf) and booleans. `pattern` is not honoured.
    """
    root = schema if root is None else root
    if schema is True or schema is None or schema == {}:
        return f"fake {key}"
    if schema is False or depth > 32:
        return None
    if "$ref" in schema:
        target = _resolve_ref(root, schema["$ref"])
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return example_for({**target, **rest} if rest else target, root, key, index, depth + 1)
    if "allOf" in schema:
        merged = _merge_all(schema, root)
        return example_for(merged, root, key, index, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        values = schema["enum"]
        return values[index % len(values)] if values else None
    for combo in ("anyOf", "oneOf"):
        if combo in schema:
            options = schema[combo]
            deep = depth > _DEEP  # recursive schemas: end with null where allowed
            pick = next((o for o in options if _is_null(o, root) == deep), options[0])
            rest = {k: v for k, v in schema.items() if k != combo}
            return example_for(
                {**rest, **pick} if isinstance(pick, dict) else pick, root, key, index, depth + 1
            )
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        if "properties" in schema or "required" in schema or "additionalProperties" in schema:
            kind = "object"
        elif "items" in schema or "prefixItems" in schema:
            kind = "array"
        elif any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            kind = "number"
        else:
            kind = "string"
    if kind == "object":
        return _example_object(schema, root, index, depth)
    if kind == "array":
        return _example_array(schema, root, key, depth)
    if kind == "integer":
        return int(_example_number(schema, index, integer=True))
    if kind == "number":
        return _example_number(schema, index, integer=False)
    if kind == "boolean":
        return index % 2 == 0
    if kind == "null":
        return None
    return _example_string(schema, key, index)


def _resolve_ref(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        raise ValueError(f"only local $ref are supported, not {ref!r}")
    node = root
    for part in ref.lstrip("#").strip("/").split("/"):
        if part:
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _is_null(schema: Any, root: Any) -> bool:
    if isinstance(schema, dict) and "$ref" in schema:
        schema = _resolve_ref(root, schema["$ref"])
    return isinstance(schema, dict) and schema.get("type") == "null"


def _merge_all(schema: dict[str, Any], root: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema["allOf"]:
        if isinstance(part, dict) and "$ref" in part:
            part = _resolve_ref(root, part["$ref"])
        if not isinstance(part, dict):
            continue
        if "allOf" in part:
            part = _merge_all(part, root)
        for k, v in part.items():
            if k == "properties":
                merged["properties"] = {**merged.get("properties", {}), **v}
            elif k == "required":
                merged["required"] = list(dict.fromkeys([*merged.get("required", []), *v]))
            else:
                merged.setdefault(k, v)
    return merged


def _example_object(schema: dict[str, Any], root: Any, index: int, depth: int) -> dict[str, Any]:
    props: dict[str, Any] = schema.get("properties") or {}
    required: list[str] = list(schema.get("required") or [])
    names = (
        list(dict.fromkeys([*required, *props])) if depth <= _DEEP else required
    )  # optional ones too, unless deep
    if "maxProperties" in schema:
        optional = [n for n in names if n not in required]
        names = required + optional[: max(0, schema["maxProperties"] - len(required))]
    extra = schema.get("additionalProperties", True)
    out: dict[str, Any] = {}
    for name in names:
        sub = props.get(name, extra if isinstance(extra, dict) else {"type": "string"})
        out[name] = example_for(sub, root, f"{name} {index + 1}" if index else name, 0, depth + 1)
    i = 0
    while len(out) < schema.get("minProperties", 0) and extra is not False:
        i += 1
        out[f"extra_{i}"] = example_for(
            extra if isinstance(extra, dict) else {"type": "string"}, root, f"extra {i}", 0, depth + 1
        )
    return out


def _example_array(schema: dict[str, Any], root: Any, key: str, depth: int) -> list[Any]:
    minimum = int(schema.get("minItems", 0))
    count = minimum if depth > _DEEP else max(minimum, 1)  # deep (recursive) schemas: as few as allowed
    if "maxItems" in schema:
        count = min(count, int(schema["maxItems"]))
    prefix = schema.get("prefixItems")
    items = schema.get("items", {})
    if isinstance(items, list):  # draft-4 tuple form
        prefix, items = items, schema.get("additionalItems", {})
    prefix = prefix or []
    count = max(count, min(len(prefix), int(schema.get("maxItems", len(prefix)))))
    out = []
    for i in range(count):
        sub = prefix[i] if i < len(prefix) else items
        out.append(example_for(sub if sub is not False else {}, root, f"{key} {i + 1}", i, depth + 1))
    return out


def _example_number(schema: dict[str, Any], index: int, integer: bool) -> float:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    ex_lo, ex_hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    step = schema.get("multipleOf")
    tiny = 1 if integer else 0.5
    if isinstance(ex_lo, bool):  # draft-4: booleans qualifying minimum/maximum
        ex_lo, lo = (lo, None) if ex_lo else (None, lo)
    if isinstance(ex_hi, bool):
        ex_hi, hi = (hi, None) if ex_hi else (None, hi)
    low = lo if lo is not None else (ex_lo + tiny if ex_lo is not None else None)
    high = hi if hi is not None else (ex_hi - tiny if ex_hi is not None else None)
    if ex_lo is not None and ex_hi is not None and not integer and ex_hi - ex_lo <= 1:
        low = high = (ex_lo + ex_hi) / 2
    if low is None:
        low = min(1, high) if high is not None else 1
    value = low + index
    if high is not None and value > high:
        value = low
    if step:
        value = -(-value // step) * step  # round up to a multiple
        if high is not None and value > high:
            value = (high // step) * step
    if integer:
        value = int(-(-value // 1))
    return value if integer else float(value)


_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "12:00:00Z",
    "email": "fake@example.com",
    "uri": "https://example.com/fake",
    "url": "https://example.com/fake",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "duration": "PT1M",
}


def _example_string(schema: dict[str, Any], key: str, index: int) -> str:
    fmt = schema.get("format")
    if fmt in _FORMATS:
        text = _FORMATS[fmt]
        if fmt == "uuid" and index:
            text = text[: -len(str(index))] + str(index)
        return text
    text = f"fake {key}" if key else "fake"
    min_len, max_len = int(schema.get("minLength", 0)), schema.get("maxLength")
    while len(text) < min_len:
        text += " text"
    if max_len is not None and len(text) > max_len:
        suffix = str(index) if index else ""
        text = text[: max(0, int(max_len) - len(suffix))] + suffix
        text = text[: int(max_len)]
    return text


# ---------------------------------------------------------------- helpers


def count_tokens(text: str) -> int:
    """Rough and deterministic: one token per whitespace-separated word and per CJK character."""
    return len(_TOKEN.findall(text))


def split_pieces(text: str) -> list[str]:
    """Word-sized stream deltas (CJK: one character each) that join back to exactly `text`."""
    pieces = _PIECE.findall(text)
    rest = text[len("".join(pieces)) :]
    if rest:
        if pieces:
            pieces[-1] += rest
        else:
            pieces = [rest]
    return pieces


def _content_text(content: Any) -> tuple[str, int]:
    """(text of a message content, number of image parts)."""
    if isinstance(content, str):
        return content, 0
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        images = sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
        return " ".join(texts), images
    return "", 0


def prompt_tokens(messages: Any) -> int:
    total = 0
    for msg in messages if isinstance(messages, list) else []:
        text, images = _content_text(msg.get("content") if isinstance(msg, dict) else None)
        total += count_tokens(text) + 3 + 85 * images  # 3 per message of framing, 85 per (low detail) image
    return total


def last_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return _content_text(msg.get("content"))[0]
    return ""


def _error_type(status: int) -> tuple[str, str]:
    return {
        400: ("invalid_request_error", "invalid_request"),
        401: ("invalid_request_error", "invalid_api_key"),
        403: ("permission_error", "permission_denied"),
        404: ("invalid_request_error", "not_found"),
        408: ("server_error", "timeout"),
        409: ("invalid_request_error", "conflict"),
        422: ("invalid_request_error", "unprocessable_entity"),
        429: ("requests", "rate_limit_exceeded"),
    }.get(
        status,
        (
            "server_error" if status >= 500 else "invalid_request_error",
            "server_error" if status >= 500 else "invalid_request",
        ),
    )


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    kind, default_code = _error_type(status)
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}
    return Response(json.dumps(body), status=status, mimetype="application/json", headers=headers)


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status=status, mimetype="application/json")


class _Fault:
    __slots__ = ("status", "body", "retry_after", "endpoint")

    def __init__(self, status: int, body: Any, retry_after: float | None, endpoint: str | None) -> None:
        self.status, self.body, self.retry_after, self.endpoint = status, body, retry_after, endpoint


def _matches(target: str | None, kind: str) -> bool:
    return kind in MODEL_KINDS if target is None else target == kind


# ---------------------------------------------------------------- the server


class FakeOpenAI:
    """OpenAI + Azure OpenAI on 127.0.0.1. See the module docstring; everything is thread-safe."""

    def __init__(self, model: str = "fake-model", *, api_key: str | None = None, port: int = 0) -> None:
        self.model = model
        self.api_key = api_key  # when set, requests must carry it (Bearer / api-key) or get 401
        self.flag_words: set[str] = set()
        self.flag_category = "violence"  # the moderation category a flag word sets
        self.delay = 0.0  # seconds before every model answer
        self.stream_delay = 0.0  # seconds between stream chunks
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._replies: deque[Reply] = deque()
        self._faults: list[_Fault] = []
        self._hangs: list[str | None] = []
        self._drops: list[int] = []
        self._responder: Responder | None = None
        self._files: dict[str, bytes] = {}
        self._server = LocalServer(self._build(), port=port)

    # ---- lifecycle
    def start(self) -> FakeOpenAI:
        self._server.start()
        return self

    def stop(self) -> None:
        """Returns at once: hanging or delayed handlers are released and open connections cut."""
        self._server.stop()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FakeOpenAI({self.url!r}, model={self.model!r})"

    @property
    def base(self) -> str:
        """http://127.0.0.1:PORT — the Azure endpoint (`azure_endpoint=fake.base`)."""
        return self._server.base

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT/v1 — the OpenAI base URL (`base_url=fake.url`)."""
        return self._server.base + "/v1"

    @property
    def port(self) -> int:
        return self._server.port

    # ---- scripting
    def script(self, *replies: Reply) -> None:
        """Queue chat replies, consumed in order: str (content), dict/list (JSON-dumped), or f(request_json)."""
        with self._lock:
            self._replies.extend(replies)

    @property
    def pending_replies(self) -> int:
        return len(self._replies)

    def set_responder(self, responder: Responder | None) -> None:
        """Replace the default responder (used when the script is empty); None restores the default."""
        self._responder = responder

    # ---- faults
    def fail_next(
        self,
        status: int = 500,
        times: int = 1,
        body: Any = None,
        retry_after: float | None = None,
        endpoint: str | None = None,
    ) -> None:
        """The next `times` model calls answer `status` with an OpenAI error body (or `body`: a dict is sent
        as JSON, a str as text — e.g. a proxy's HTML page). `retry_after` adds a Retry-After header.
        `endpoint` = "chat" | "moderations" | "images" limits it to one kind (default: any of them)."""
        with self._lock:
            self._faults.extend(_Fault(status, body, retry_after, endpoint) for _ in range(times))

    def hang_next(self, times: int = 1, endpoint: str | None = None) -> None:
        """The next `times` model calls are accepted and never answered (until stop())."""
        with self._lock:
            self._hangs.extend([endpoint] * times)

    def drop_stream_after(self, n_chunks: int | None, times: int = 1) -> None:
        """The next `times` streamed chats close the connection after sending `n_chunks` SSE events
        (the first is the role chunk), without the final chunk or [DONE]. None cancels."""
        with self._lock:
            self._drops = [] if n_chunks is None else [*self._drops, *([n_chunks] * times)]

    def reset(self) -> None:
        """Back to a fresh server (same port, same model): no log, script, faults, responder or delays."""
        with self._lock:
            self.requests.clear()
            self._replies.clear()
            self._faults.clear()
            self._hangs.clear()
            self._drops.clear()
            self._files.clear()
            self.max_in_flight = self.in_flight
        self._responder = None
        self.delay = 0.0
        self.stream_delay = 0.0
        self.flag_words = set()
        self.flag_category = "violence"

    # ---- inspection
    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in list(self.requests) if r["kind"] == "chat"]

    def last_chat(self) -> dict[str, Any]:
        """The JSON body of the last chat request (AssertionError when there was none)."""
        chats = self.chat_requests()
        assert chats, "no chat request reached the fake"
        return chats[-1]["json"]

    def wait_for_requests(self, n: int, timeout: float = 5.0, kind: str | None = None) -> bool:
        """Block until `n` requests (of `kind`, e.g. "chat") have arrived; False on timeout."""

        def enough() -> bool:
            return sum(1 for r in self.requests if kind is None or r["kind"] == kind) >= n

        with self._changed:
            return self._changed.wait_for(enough, timeout)

    # ---- internals
    def _record(self, kind: str) -> dict[str, Any]:
        entry = {
            "path": request.path,
            "method": request.method,
            "kind": kind,
            "time": time.time(),
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "json": request.get_json(silent=True),
            "args": dict(request.args),
            "deployment": (request.view_args or {}).get("deployment"),
        }
        with self._changed:
            self.requests.append(entry)
            self._changed.notify_all()
        return entry

    def _admit(self, kind: str) -> tuple[dict[str, Any], Response | None]:
        """Record the request, then the answer that refuses it (bad key, injected fault), if any."""
        entry = self._record(kind)
        denied = self._auth()
        return entry, (denied if denied is not None else self._fault(kind))

    def _auth(self) -> Response | None:
        """/v1: Bearer key (checked only when `api_key` is set). Azure (/openai/...): api-key header (or an
        Entra Bearer token) always required; deployment paths also need ?api-version=."""
        bearer = request.headers.get("Authorization", "")
        key = request.headers.get("api-key")
        if _is_azure():
            if "/deployments/" in request.path and "api-version" not in request.args:
                return error_response(
                    404, "Resource not found (missing api-version query parameter)", code="404"
                )
            if not key and not bearer.startswith("Bearer "):
                return error_response(
                    401,
                    "Access denied due to missing subscription key. Make sure to "
                    "include an api-key header when making requests.",
                    code="401",
                )
            if self.api_key is not None and key != self.api_key and bearer != f"Bearer {self.api_key}":
                return error_response(
                    401, "Access denied due to invalid subscription key or wrong API endpoint.", code="401"
                )
            return None
        if self.api_key is None:
            return None
        if not bearer:
            return error_response(
                401,
                "You didn't provide an API key. You need to provide your API key in "
                "an Authorization header using Bearer auth.",
                code=None,
            )
        if bearer != f"Bearer {self.api_key}":
            return error_response(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    def _fault(self, kind: str) -> Response | None:
        with self._lock:
            hang = next((i for i, t in enumerate(self._hangs) if _matches(t, kind)), None)
            if hang is not None:
                del self._hangs[hang]
            fault = None
            if hang is None:
                at = next((i for i, f in enumerate(self._faults) if _matches(f.endpoint, kind)), None)
                fault = self._faults.pop(at) if at is not None else None
        if hang is not None:
            self._server.released.wait()
            return error_response(503, "the fake server stopped while hanging")
        if fault is None:
            return None
        headers = {}
        if fault.retry_after is not None:
            ra = fault.retry_after
            headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
        if isinstance(fault.body, str):
            mimetype = "text/html" if fault.body.lstrip().startswith("<") else "text/plain"
            return Response(fault.body, status=fault.status, mimetype=mimetype, headers=headers)
        if fault.body is not None:
            return Response(
                json.dumps(fault.body), status=fault.status, mimetype="application/json", headers=headers
            )
        message = {429: "Rate limit reached for requests (injected by the fake)."}.get(
            fault.status, f"The server had an error while processing your request (injected {fault.status})."
        )
        return error_response(fault.status, message, headers=headers)

    def _reply_for(self, body: dict[str, Any]) -> str:
        with self._lock:
            reply = self._replies.popleft() if self._replies else None
        if reply is None:
            reply = (self._responder or self.default_reply)(body)
        elif callable(reply):
            reply = reply(body)
        return reply if isinstance(reply, str) else json.dumps(reply, ensure_ascii=False)

    def default_reply(self, body: dict[str, Any]) -> Any:
        """JSON valid against the request's schema when JSON was asked for, else "Fake reply to: ..."."""
        fmt = body.get("response_format") or {}
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        schema = None
        if kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
        elif kind == "json_object":
            schema = fmt.get("schema") or {
                "type": "object",
                "properties": {"answer": {"type": "string"}},
                "required": ["answer"],
            }
        if schema is not None:
            value = example_for(schema)
            if kind == "json_object" and not fmt.get("schema") and isinstance(value, dict):
                value = {"answer": f"Fake reply to: {last_user_text(body)[:40]}"}
            return value
        return f"Fake reply to: {last_user_text(body)[:40]}"

    def _delay(self) -> bool:
        """Sleep `delay`; True when the server was stopped meanwhile."""
        return bool(self.delay) and self._server.wait(self.delay)

    # ---- routes
    def _build(self) -> Flask:
        app = Flask("fake_openai")

        @app.post("/v1/chat/completions")
        @app.post("/openai/v1/chat/completions")
        @app.post("/openai/deployments/<deployment>/chat/completions")
        def chat(deployment: str | None = None) -> Response:
            self._record("chat")
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return self._chat(deployment)
            finally:
                with self._lock:
                    self.in_flight -= 1

        @app.post("/v1/moderations")
        @app.post("/openai/v1/moderations")
        @app.post("/openai/deployments/<deployment>/moderations")
        def moderations(deployment: str | None = None) -> Response:
            refused = self._admit("moderations")[1]
            if refused is not None:
                return refused
            body = request.get_json(silent=True)
            if not isinstance(body, dict) or "input" not in body:
                return error_response(
                    400,
                    "Missing required parameter: 'input'.",
                    param="input",
                    code="missing_required_parameter",
                )
            if self._delay():
                return error_response(503, "stopped")
            return _json(
                {
                    "id": "modr-" + secrets.token_hex(8),
                    "model": body.get("model") or "omni-moderation-latest",
                    "results": [self._moderate(text) for text in _moderation_inputs(body["input"])],
                }
            )

        @app.post("/v1/images/generations")
        @app.post("/openai/v1/images/generations")
        @app.post("/openai/deployments/<deployment>/images/generations")
        def images(deployment: str | None = None) -> Response:
            refused = self._admit("images")[1]
            if refused is not None:
                return refused
            return self._images(request.get_json(silent=True))

        @app.post("/v1/images/edits")
        @app.post("/openai/v1/images/edits")
        @app.post("/openai/deployments/<deployment>/images/edits")
        def image_edits(deployment: str | None = None) -> Response:
            """multipart/form-data like the real API: fields + `image` (and optional `mask`) files."""
            entry, refused = self._admit("images")
            if refused is not None:
                return refused
            files = request.files.getlist("image") or request.files.getlist("image[]")
            if not files:
                return error_response(
                    400,
                    "Missing required parameter: 'image'.",
                    param="image",
                    code="missing_required_parameter",
                )
            entry["form"] = dict(request.form)
            entry["files"] = {"image": files[0].read()}
            if "mask" in request.files:
                entry["files"]["mask"] = request.files["mask"].read()
            body: dict[str, Any] = dict(request.form)
            if "n" in body:
                body["n"] = int(body["n"]) if str(body["n"]).isdigit() else body["n"]
            return self._images(body)

        @app.get("/files/<file_id>.png")
        def files(file_id: str) -> Response:
            self._record("files")
            raw = self._files.get(file_id)
            if raw is None:
                return error_response(404, f"No such file: {file_id}")
            return Response(raw, mimetype="image/png")

        # /openai/models: Azure's data-plane list (?api-version=), what AzureOpenAI.models.list() calls
        @app.get("/v1/models")
        @app.get("/openai/v1/models")
        @app.get("/openai/models")
        def models() -> Response:
            refused = self._admit("models")[1]
            if refused is not None:
                return refused
            return _json({"object": "list", "data": [self._model_card()]})

        @app.get("/v1/models/<path:model>")
        def model(model: str) -> Response:
            self._record("models")
            if model != self.model:
                return error_response(
                    404, f"The model '{model}' does not exist", code="model_not_found", param="model"
                )
            return _json(self._model_card())

        @app.errorhandler(404)
        def not_found(_: Exception) -> Response:
            return error_response(404, f"Invalid URL ({request.method} {request.path})", code=None)

        @app.errorhandler(405)
        def not_allowed(_: Exception) -> Response:
            return error_response(405, f"Method {request.method} not allowed for {request.path}", code=None)

        return app

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": 1700000000, "owned_by": "fake"}

    def _chat(self, deployment: str | None) -> Response:
        azure = _is_azure()
        denied = self._auth()
        if denied is not None:
            return denied
        fault = self._fault("chat")
        if fault is not None:
            return fault
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return error_response(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely "
                "means you aren't using your HTTP library correctly.)",
                code=None,
            )
        if not deployment and not body.get("model"):
            return error_response(
                400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error_response(
                400,
                "Missing required parameter: 'messages'."
                if messages is None
                else "Invalid 'messages': expected a non-empty array.",
                param="messages",
                code="missing_required_parameter" if messages is None else "invalid_value",
            )
        if self._delay():
            return error_response(503, "stopped")
        text = self._reply_for(body)
        model = body.get("model") or self.model
        p_tokens = prompt_tokens(messages)
        if body.get("stream"):
            return self._stream(text, model, p_tokens, body, azure)
        c_tokens = count_tokens(text)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
        n = max(1, int(body.get("n") or 1))
        out: dict[str, Any] = {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{**choice, "index": i} for i in range(n)],
            "usage": {
                "prompt_tokens": p_tokens,
                "completion_tokens": c_tokens * n,
                "total_tokens": p_tokens + c_tokens * n,
            },
        }
        if azure:
            out["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": _azure_filters()}]
            for c in out["choices"]:
                c["content_filter_results"] = _azure_filters()
        return _json(out)

    def _stream(self, text: str, model: str, p_tokens: int, body: dict[str, Any], azure: bool) -> Response:
        chunk_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        pieces = split_pieces(text)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        with self._lock:
            drop_after = self._drops.pop(0) if self._drops else None
        sock = request.environ.get("werkzeug.socket")

        def event(payload: Any) -> bytes:
            return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n".encode()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                out["usage"] = None
            return out

        events: list[Any] = []
        if azure:  # Azure sends the prompt filter results first, in a chunk with no choices
            events.append(
                {
                    "id": "",
                    "object": "",
                    "created": 0,
                    "model": "",
                    "choices": [],
                    "prompt_filter_results": [
                        {"prompt_index": 0, "content_filter_results": _azure_filters()}
                    ],
                }
            )
        events.append(chunk({"role": "assistant", "content": "", "refusal": None}))
        events.extend(chunk({"content": piece}) for piece in pieces)
        events.append(chunk({}, "stop"))
        if include_usage:
            c_tokens = count_tokens(text)
            events.append(
                {
                    "id": chunk_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_fake",
                    "choices": [],
                    "usage": {
                        "prompt_tokens": p_tokens,
                        "completion_tokens": c_tokens,
                        "total_tokens": p_tokens + c_tokens,
                    },
                }
            )
        events.append("[DONE]")

        def gen() -> Iterator[bytes]:
            for i, payload in enumerate(events):
                if drop_after is not None and i >= drop_after:
                    if sock is not None:
                        abort_socket(sock)
                    return
                if i and self.stream_delay and self._server.wait(self.stream_delay):
                    return
                yield event(payload)

        return Response(gen(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _moderate(self, text: str) -> dict[str, Any]:
        hits = [w for w in self.flag_words if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, re.IGNORECASE)]
        flagged = bool(hits)
        categories = {c: flagged and c == self.flag_category for c in MODERATION_CATEGORIES}
        return {
            "flagged": flagged,
            "categories": categories,
            "category_scores": {c: (0.98 if v else 0.0004) for c, v in categories.items()},
            "category_applied_input_types": {c: ["text"] for c in MODERATION_CATEGORIES},
        }

    def _images(self, body: Any) -> Response:
        if not isinstance(body, dict) or not body.get("prompt"):
            return error_response(
                400,
                "Missing required parameter: 'prompt'.",
                param="prompt",
                code="missing_required_parameter",
            )
        size = str(body.get("size") or "1024x1024")
        match = re.fullmatch(r"(\d{1,4})x(\d{1,4})", size.lower())
        if size == "auto":
            width = height = 1024
        elif match and 0 < int(match[1]) <= 4096 and 0 < int(match[2]) <= 4096:
            width, height = int(match[1]), int(match[2])
        else:
            return error_response(
                400,
                f"Invalid value for 'size': {size!r}. Use e.g. '1024x1024'.",
                param="size",
                code="invalid_value",
            )
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 10:
            return error_response(
                400, f"Invalid value for 'n': {n!r}; must be 1..10.", param="n", code="invalid_value"
            )
        response_format = body.get("response_format") or "b64_json"
        if response_format not in ("b64_json", "url"):
            return error_response(
                400,
                f"Invalid value for 'response_format': {response_format!r}.",
                param="response_format",
                code="invalid_value",
            )
        if self._delay():
            return error_response(503, "stopped")
        data = []
        for i in range(n):
            raw = png_bytes(width, height, f"{body['prompt']}#{i}", f"fake openai\n{body['prompt'][:40]}")
            if response_format == "url":
                file_id = secrets.token_hex(8)
                self._files[file_id] = raw
                data.append({"url": f"{self.base}/files/{file_id}.png", "revised_prompt": body["prompt"]})
            else:
                data.append(
                    {"b64_json": base64.b64encode(raw).decode("ascii"), "revised_prompt": body["prompt"]}
                )
        return _json({"created": int(time.time()), "data": data})


def _is_azure() -> bool:
    return request.path.startswith("/openai/")


def _moderation_inputs(value: Any) -> list[str]:
    """str -> [str]; [str, ...] -> each; [content parts] (omni) -> one input of their texts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [" ".join(p.get("text", "") for p in value if p.get("type") == "text")]
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


def _azure_filters() -> dict[str, Any]:
    return {c: {"filtered": False, "severity": "safe"} for c in ("hate", "self_harm", "sexual", "violence")}
