"""A fake OpenAI-compatible server: chat completions (incl. streaming), the Azure deployment path,
moderations, image generations and models — real HTTP on 127.0.0.1, scriptable, with faults.

    with FakeOpenAI() as fake:
        fake.script("hello", {"title": "A"})      # next replies, in order
        fake.fail_next(500, times=2)              # then errors
        client = openai.OpenAI(base_url=fake.url, api_key="k")
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request
from PIL import Image, ImageDraw

from .server import BackgroundServer

Reply = Any  # str | dict | list | Callable[[dict], str | dict | list]


def example_for(schema: dict[str, Any], depth: int = 0, key: str = "x") -> Any:
    """A small deterministic value that validates against a JSON schema (the subset our templates use)."""
    if depth > 12:
        return None
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for combo in ("anyOf", "oneOf"):
        if combo in schema:
            return example_for(schema[combo][0], depth + 1, key)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else ("array" if "items" in schema else "string")
    if kind == "object":
        props = schema.get("properties", {})
        required = schema.get("required", list(props)[: max(1, schema.get("minProperties", 0))] if props else [])
        return {name: example_for(props.get(name, {"type": "string"}), depth + 1, name) for name in required}
    if kind == "array":
        count = schema.get("minItems", 1) or 1
        count = min(count, schema.get("maxItems", count))
        item = schema.get("items", {"type": "string"})
        return [example_for(item, depth + 1, f"{key} {i + 1}") for i in range(count)]
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 1.0))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = f"fake {key}"
    min_len, max_len = schema.get("minLength", 0), schema.get("maxLength", 200)
    while len(text) < min_len:
        text += " text"
    return text[:max_len]


def _words(text: str) -> int:
    return max(1, len(text.split()))


def png_bytes(width: int, height: int, label: str) -> bytes:
    seed = abs(hash(label)) % 200
    img = Image.new("RGB", (width, height), (40 + seed, 90, 200 - seed // 2))
    ImageDraw.Draw(img).text((8, 8), label[:40], fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class FakeOpenAI:
    def __init__(self, model: str = "fake-model") -> None:
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.flag_words: set[str] = set()
        self.delay = 0.0
        self.stream_delay = 0.0
        self._replies: deque[Reply] = deque()
        self._faults: deque[tuple[int, Any, float | None]] = deque()
        self._hangs = 0
        self._drop_after: int | None = None
        self._responder: Callable[[dict[str, Any]], Any] | None = None
        self._files: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self._server = BackgroundServer(self._build())

    # ---- lifecycle
    def start(self) -> FakeOpenAI:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base(self) -> str:
        return self._server.base

    @property
    def url(self) -> str:
        return self._server.base + "/v1"

    # ---- scripting and faults
    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def set_responder(self, responder: Callable[[dict[str, Any]], Any] | None) -> None:
        self._responder = responder

    def fail_next(self, status: int = 500, times: int = 1, body: Any = None, retry_after: float | None = None) -> None:
        with self._lock:
            for _ in range(times):
                self._faults.append((status, body, retry_after))

    def hang_next(self, times: int = 1) -> None:
        self._hangs += times

    def drop_stream_after(self, n_chunks: int | None) -> None:
        self._drop_after = n_chunks

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._replies.clear()
            self._faults.clear()
        self._hangs = 0
        self._drop_after = None
        self.max_in_flight = 0

    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    # ---- internals
    def _record(self) -> dict[str, Any]:
        entry = {"path": request.path, "method": request.method, "time": time.time(),
                 "headers": {k.lower(): v for k, v in request.headers.items()},
                 "json": request.get_json(silent=True), "args": dict(request.args)}
        with self._lock:
            self.requests.append(entry)
        return entry

    def _fault(self) -> Response | None:
        if self._hangs > 0:
            self._hangs -= 1
            self._server.release.wait()
            return _error(503, "server stopped while hanging")
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is None:
            return None
        status, body, retry_after = fault
        resp = jsonify(body or {"error": {"message": f"injected failure {status}", "type": "server_error",
                                          "code": str(status)}})
        resp.status_code = status
        if retry_after is not None:
            resp.headers["Retry-After"] = str(retry_after)
        return resp

    def _reply_for(self, body: dict[str, Any]) -> str:
        with self._lock:
            reply = self._replies.popleft() if self._replies else None
        if reply is None:
            reply = self._responder(body) if self._responder else self._default(body)
        elif callable(reply):
            reply = reply(body)
        return reply if isinstance(reply, str) else json.dumps(reply, ensure_ascii=False)

    def _default(self, body: dict[str, Any]) -> Any:
        fmt = body.get("response_format") or {}
        schema = None
        if fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
        elif fmt.get("type") == "json_object":
            schema = fmt.get("schema") or {"type": "object", "properties": {"answer": {"type": "string"}},
                                           "required": ["answer"]}
        if schema is not None:
            return example_for(schema)
        last = ""
        for msg in reversed(body.get("messages") or []):
            if msg.get("role") == "user":
                content = msg.get("content")
                if isinstance(content, list):
                    content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
                last = content or ""
                break
        return f"Fake reply to: {last[:40]}"

    def _build(self) -> Flask:
        app = Flask("fake_openai")

        @app.post("/v1/chat/completions")
        @app.post("/openai/deployments/<deployment>/chat/completions")
        def chat(deployment: str | None = None) -> Response:
            self._record()
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if deployment is not None and not request.headers.get("api-key"):
                    return _error(401, "missing api-key header")
                fault = self._fault()
                if fault is not None:
                    return fault
                if self.delay:
                    if self._server.release.wait(self.delay):
                        return _error(503, "stopped")
                body = request.get_json(silent=True) or {}
                text = self._reply_for(body)
                model = body.get("model") or deployment or self.model
                prompt_tokens = sum(_words(json.dumps(m.get("content"), ensure_ascii=False))
                                    for m in body.get("messages") or [])
                if body.get("stream"):
                    return self._stream(text, model, prompt_tokens, body)
                return jsonify({
                    "id": "chatcmpl-" + secrets.token_hex(6), "object": "chat.completion", "created": int(time.time()),
                    "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": _words(text),
                              "total_tokens": prompt_tokens + _words(text)},
                })
            finally:
                with self._lock:
                    self.in_flight -= 1

        @app.post("/v1/moderations")
        @app.post("/openai/deployments/<deployment>/moderations")
        def moderations(deployment: str | None = None) -> Response:
            self._record()
            fault = self._fault()
            if fault is not None:
                return fault
            body = request.get_json(silent=True) or {}
            inputs = body.get("input")
            texts = inputs if isinstance(inputs, list) else [inputs or ""]
            results = []
            for text in texts:
                hits = [w for w in self.flag_words if w.lower() in str(text).lower()]
                cats = {c: bool(hits) and c == "violence" for c in ("hate", "harassment", "self-harm", "sexual",
                                                                     "violence")}
                results.append({"flagged": bool(hits), "categories": cats,
                                "category_scores": {c: (0.99 if v else 0.001) for c, v in cats.items()}})
            return jsonify({"id": "modr-" + secrets.token_hex(6), "model": "omni-moderation-latest",
                            "results": results})

        @app.post("/v1/images/generations")
        @app.post("/openai/deployments/<deployment>/images/generations")
        def images(deployment: str | None = None) -> Response:
            self._record()
            fault = self._fault()
            if fault is not None:
                return fault
            body = request.get_json(silent=True) or {}
            size = str(body.get("size") or "512x512")
            try:
                width, height = (int(v) for v in size.lower().split("x"))
            except ValueError:
                return _error(400, f"invalid size {size}")
            data = []
            for i in range(int(body.get("n") or 1)):
                raw = png_bytes(width, height, f"{body.get('prompt', '')}#{i}")
                if body.get("response_format") == "url":
                    file_id = secrets.token_hex(8)
                    self._files[file_id] = raw
                    data.append({"url": f"{self.base}/files/{file_id}.png"})
                else:
                    data.append({"b64_json": base64.b64encode(raw).decode()})
            return jsonify({"created": int(time.time()), "data": data})

        @app.get("/files/<file_id>.png")
        def files(file_id: str) -> Response:
            raw = self._files.get(file_id)
            if raw is None:
                return _error(404, "no such file")
            return Response(raw, mimetype="image/png")

        @app.get("/v1/models")
        def models() -> Response:
            self._record()
            return jsonify({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]})

        return app

    def _stream(self, text: str, model: str, prompt_tokens: int, body: dict[str, Any]) -> Response:
        chunk_id = "chatcmpl-" + secrets.token_hex(6)
        pieces = [p for p in _split_words(text) if p]
        drop_after = self._drop_after
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return "data: " + json.dumps({
                "id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}, ensure_ascii=False) + "\n\n"

        def gen() -> Any:
            yield chunk({"role": "assistant", "content": ""})
            for i, piece in enumerate(pieces):
                if drop_after is not None and i >= drop_after:
                    raise ConnectionAbortedError("fake: dropping the stream")
                if self.stream_delay and self._server.release.wait(self.stream_delay):
                    return
                yield chunk({"content": piece})
            yield chunk({}, "stop")
            if include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                         "total_tokens": prompt_tokens + len(pieces)}
                yield "data: " + json.dumps({"id": chunk_id, "object": "chat.completion.chunk", "model": model,
                                             "created": int(time.time()), "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return Response(gen(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


def _split_words(text: str) -> list[str]:
    """Word-sized deltas that join back to exactly `text`."""
    out: list[str] = []
    current = ""
    for ch in text:
        if ch == " " and current.strip():
            out.append(current)
            current = ch
        else:
            current += ch
    if current:
        out.append(current)
    return out


def _error(status: int, message: str) -> Response:
    resp = jsonify({"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                              "code": str(status)}})
    resp.status_code = status
    return resp
