"""The seeds' response envelope `{success, code, message, data}` and BusinessException.

InsPilot/Refinity and StepIdeator frontends read `success` (and `message`) from
every reply. The originals always answered HTTP 200; we keep the body and send
real statuses (their frontends parse the body without checking the status).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, current_app, has_request_context, jsonify, request

SUCCESS = 0
BUSINESS_FAIL = 1


class BusinessException(Exception):
    """A business/validation failure reported in the envelope (code 1 by default)."""

    def __init__(self, code: int = BUSINESS_FAIL, message: str = "", *, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class EnvelopeScope:
    """The blueprints (and URL prefixes, for unmatched paths) whose errors use the envelope.

    Held in `app.extensions["envelope"]`, filled when each app mounts its blueprint.
    """

    def __init__(self) -> None:
        self.blueprints: set[str] = set()
        self.prefixes: set[str] = set()

    def add(self, blueprint_name: str, url_prefix: str | None = None) -> None:
        self.blueprints.add(blueprint_name)
        if url_prefix:
            self.prefixes.add(url_prefix.rstrip("/") + "/")

    def covers(self, blueprint: str | None, path: str, matched: bool) -> bool:
        if blueprint and blueprint.split(".")[0] in self.blueprints:
            return True
        if not matched:  # unmatched route: decide by prefix
            return any(path.startswith(p) for p in self.prefixes)
        return False


def envelope_scope(app: Flask) -> EnvelopeScope:
    """This app's envelope scope (created on first use)."""
    return app.extensions.setdefault("envelope", EnvelopeScope())


def uses_envelope() -> bool:
    if not has_request_context():
        return False
    scope: EnvelopeScope | None = current_app.extensions.get("envelope")
    return scope is not None and scope.covers(request.blueprint, request.path, request.url_rule is not None)


def envelope(data: Any = None, *, status: int = 200) -> Response:
    resp = jsonify({"success": True, "code": SUCCESS, "message": "", "data": data})
    resp.status_code = status
    return resp


def envelope_fail(
    message: str, *, code: int = BUSINESS_FAIL, status: int = 400, data: Any = None
) -> Response:
    resp = jsonify({"success": False, "code": code, "message": message, "data": data})
    resp.status_code = status
    return resp
