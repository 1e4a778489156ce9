"""One JSON error shape for every failure, and the seeds' envelope for the apps that need it.

Plain API error body (every status, never an HTML page):
    {"error": {"status": 422, "code": "validation_error", "message": "..."}, "detail": [...]}
`detail` follows FastAPI's shape ({"loc": [...], "msg", "type"}) because two of the
original frontends (storybook, storyteller) were written against FastAPI.

Envelope apps (refinement, ideation) answer `{"success": false, "code", "message", "data": null}`
with a real HTTP status; their frontends only read `success` and `message`.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from agent.types import ModelError

from .envelope import BusinessException, envelope_fail, uses_envelope

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raise from services for a clean 4xx/5xx with a stable machine-readable code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        detail: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _default_code(status)
        self.detail = detail
        self.headers = headers or {}


_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    502: "model_error",
    503: "unavailable",
    504: "timeout",
}


def _default_code(status: int) -> str:
    return _CODES.get(status, "error")


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    detail: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    envelope_code: int = 1,
) -> Response:
    """The single builder every handler uses."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # client text may hold surrogates
    if uses_envelope():
        resp = envelope_fail(message, code=envelope_code, status=status)
    else:
        body: dict[str, Any] = {
            "error": {"status": status, "code": code or _default_code(status), "message": message}
        }
        if detail is not None:
            body["detail"] = detail
        resp = jsonify(body)
        resp.status_code = status
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def _location(first: Any) -> str:
    if request.view_args and first in request.view_args:
        return "path"
    if request.method in ("GET", "DELETE", "HEAD"):
        return "query"
    if request.mimetype == "multipart/form-data" or request.mimetype == "application/x-www-form-urlencoded":
        return "form"
    return "body"


def _echoable(value: Any) -> Any:
    """The input echoed in a 422, made encodable (a lone surrogate would break the JSON answer) and short."""
    if isinstance(value, str):
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value if len(value) <= 200 else value[:200] + "..."
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return str(value)
    return value


def pydantic_detail(exc: ValidationError, location: str | None = None) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors(include_url=False, include_context=False):
        loc = list(err.get("loc", ()))
        where = location or _location(loc[0] if loc else None)
        item = {"loc": [where, *loc], "msg": err.get("msg", ""), "type": err.get("type", "")}
        if "input" in err and isinstance(err["input"], (str, int, float, bool, type(None))):
            item["input"] = _echoable(err["input"])
        out.append(item)
    return out


def _summary(detail: list[dict[str, Any]]) -> str:
    parts = []
    for d in detail[:5]:
        field = ".".join(str(p) for p in d["loc"][1:]) or d["loc"][0]
        parts.append(f"{field}: {d['msg']}")
    more = f" (+{len(detail) - 5} more)" if len(detail) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def validation_error_response(exc: ValidationError) -> Response:
    """flask-openapi3's validation callback: bad JSON -> 400, wrong type -> 415, else 422."""
    if request.method in ("POST", "PUT", "PATCH"):
        raw = request.get_data(cache=True)
        if raw and request.mimetype in ("", "text/plain") and not request.files and not request.form:
            return error_response(415, "Content-Type must be application/json")
        if raw and request.is_json:
            try:
                request.get_json(force=True, silent=False)
            except Exception:  # noqa: BLE001 - any decode failure is the client's malformed JSON
                return error_response(400, "request body is not valid JSON", code="malformed_json")
        if not raw and all(not e.get("loc") for e in exc.errors()):
            return error_response(
                400, "request body is missing (expected a JSON object)", code="missing_body"
            )
    detail = pydantic_detail(exc)
    return error_response(422, _summary(detail), detail=detail)


def register_error_handlers(app: Flask) -> None:
    @app.before_request
    def _enforce_body_limit() -> None:
        """Refuse oversized bodies up front, even on routes that never read the body."""
        limit = app.config.get("MAX_CONTENT_LENGTH")
        if limit and request.content_length is not None and request.content_length > limit:
            raise RequestEntityTooLarge()

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, code=exc.code, detail=exc.detail, headers=exc.headers)

    @app.errorhandler(BusinessException)
    def _business(exc: BusinessException) -> Response:
        if uses_envelope():
            resp = envelope_fail(exc.message, code=exc.code, status=exc.status)
            return resp
        return error_response(exc.status, exc.message)

    @app.errorhandler(ValidationError)
    def _pydantic(exc: ValidationError) -> Response:
        detail = pydantic_detail(exc, "body")
        return error_response(422, _summary(detail), detail=detail)

    @app.errorhandler(ModelError)
    def _model(exc: ModelError) -> Response:
        status = 503 if exc.status in (None, 429) or exc.retryable else 502
        what = "image service" if exc.kind == "image" else "language model"
        log.warning("model error (%s): %s", exc.provider, exc.message)
        return error_response(
            status,
            f"the {what} failed: {exc.message}",
            code="model_error",
            envelope_code=2,
            headers={"Retry-After": "10"} if status == 503 else None,
        )

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> Response:
        limit = app.config.get("MAX_CONTENT_LENGTH")
        return error_response(413, f"request body too large (limit {limit} bytes)")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = exc.description or exc.name
        headers = {}
        valid = getattr(exc, "valid_methods", None)
        if status == 405 and valid:
            headers["Allow"] = ", ".join(valid)
        if exc.response is not None and exc.response.mimetype == "application/json":
            return exc.response  # already ours (e.g. abort(validation_error_response(...)))
        return error_response(status, message, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal server error (the error was logged)")
