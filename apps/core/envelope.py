"""The seeds' response envelope `{success, code, message, data}` and BusinessException.

InsPilot/Refinity and StepIdeator frontends read `success` (and `message`) from
every reply. The originals always answered HTTP 200; we keep the body and send
real statuses (their frontends parse the body without checking the status).
"""

from __future__ import annotations

from typing import Any

from flask import Response, has_request_context, jsonify, request

SUCCESS = 0
BUSINESS_FAIL = 1
AGENT_FAIL = 2

_ENVELOPE_BLUEPRINTS: set[str] = set()
_ENVELOPE_PREFIXES: set[str] = set()


class BusinessException(Exception):
    """A business/validation failure reported in the envelope (code 1 by default)."""

    def __init__(self, code: int = BUSINESS_FAIL, message: str = "", *, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def mark_envelope(blueprint_name: str, url_prefix: str | None = None) -> None:
    """Declare that a blueprint's errors use the envelope (its frontend expects it)."""
    _ENVELOPE_BLUEPRINTS.add(blueprint_name)
    if url_prefix:
        _ENVELOPE_PREFIXES.add(url_prefix.rstrip("/") + "/")


def uses_envelope() -> bool:
    if not has_request_context():
        return False
    if request.blueprint and request.blueprint.split(".")[0] in _ENVELOPE_BLUEPRINTS:
        return True
    if request.url_rule is None:  # unmatched route: decide by prefix
        return any(request.path.startswith(p) for p in _ENVELOPE_PREFIXES)
    return False


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
