"""Database outages answer 503 JSON with Retry-After, never an HTML page, a generic 500 or a hang;
and the OpenAPI document describes the error bodies the server really sends.

pymongo raises ServerSelectionTimeoutError (no server within serverSelectionTimeoutMS,
5 s here), AutoReconnect / NetworkTimeout (a connection broke mid-operation) and
ConnectionFailure; all of them mean "the database is away for now", which is the
server's fault and temporary, so the client is told to retry. The MongoClient
reconnects by itself once the database is back: nothing here needs a restart.

Registered on the app, these handlers are more specific than the catch-all
`Exception` handler in errors.py, so they win for these exception types.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, request
from pymongo.errors import ConnectionFailure, NotPrimaryError

from .errors import error_response

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5


def database_unavailable(exc: Exception) -> Response:
    log.warning("database unavailable on %s %s: %s", request.method, request.path, type(exc).__name__)
    return error_response(
        503,
        "the database is temporarily unavailable; retry shortly",
        code="database_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
        envelope_code=2,
    )


def init_resilience(app: Flask) -> None:
    # ConnectionFailure covers AutoReconnect, NetworkTimeout and ServerSelectionTimeoutError;
    # NotPrimaryError (an election in a replica set) is an AutoReconnect too, listed for clarity.
    for exc_type in (ConnectionFailure, NotPrimaryError):
        app.register_error_handler(exc_type, database_unavailable)
    if hasattr(app, "generate_spec_json"):
        document_error_bodies(app)


# The bodies error_response() sends (apps/core/errors.py): the plain shape or the seeds' envelope.
ERROR_BODY_SCHEMA: dict[str, Any] = {
    "title": "ErrorResponse",
    "anyOf": [
        {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["status", "code", "message"],
                    "properties": {
                        "status": {"type": "integer"},
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                    },
                },
                "detail": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["loc", "msg", "type"],
                        "properties": {
                            "loc": {"type": "array"},
                            "msg": {"type": "string"},
                            "type": {"type": "string"},
                        },
                    },
                },
            },
        },
        {
            "type": "object",
            "required": ["success", "code", "message"],
            "properties": {
                "success": {"type": "boolean"},
                "code": {"type": "integer"},
                "message": {"type": "string"},
                "data": {},
            },
        },
    ],
}


def document_error_bodies(app: Any) -> None:
    """Replace flask-openapi3's default 422 schema (a bare array of ValidationErrorModel, which this
    server never sends) with the real error body, so clients and schema checks see the truth."""
    generate = app.generate_spec_json

    def generate_with_real_errors() -> None:
        generate()
        spec = app.spec_json
        spec.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = ERROR_BODY_SCHEMA
        ref = {"$ref": "#/components/schemas/ErrorResponse"}
        for path_item in spec.get("paths", {}).values():
            for operation in path_item.values():
                if not isinstance(operation, dict):
                    continue
                response = (operation.get("responses") or {}).get("422")
                schema = (((response or {}).get("content") or {}).get("application/json") or {}).get(
                    "schema"
                ) or {}
                if schema.get("type") == "array" and "ValidationErrorModel" in str(schema.get("items")):
                    response["description"] = (
                        "Invalid request (JSON error body; the envelope for ideation/refinement)"
                    )
                    response["content"]["application/json"]["schema"] = ref

    app.generate_spec_json = generate_with_real_errors
