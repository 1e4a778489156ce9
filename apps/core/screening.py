"""Screen every request body before any route sees it: nesting depth and lone surrogates.

Why here and not in each schema: the hazards are in the JSON itself, before validation.
- Deep nesting: Python's json parser raises RecursionError (not ValueError) past ~1,000 levels,
  which Flask does not catch (a 500); shallower but still deep values make pydantic, BSON (max 100
  levels) or our own walkers fail later. Anything deeper than MAX_JSON_DEPTH is a 400 here.
- Lone UTF-16 surrogates (`"\\ud800"` is valid JSON): Python keeps them in `str`, but they cannot be
  encoded as UTF-8, so the database write, the log line or the 422 echo of the input fails (a 500
  after something was already written). Any such string (value or key) is a 422 here.
Form fields are screened too: flask-openapi3 parses form values that look like JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Flask, request

from .errors import ApiError

MAX_JSON_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def find_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> tuple[int, str] | None:
    """(status, message) for the first depth or surrogate problem in a parsed JSON value, else None.

    Iterative: the value may be as deep as the parser allowed.
    """
    stack: list[tuple[Any, int, str]] = [(value, 1, "$")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return 422, f"{path}: a string contains a lone UTF-16 surrogate (not valid Unicode text)"
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > max_depth:
            return 400, f"JSON nested deeper than {max_depth} levels"
        if isinstance(node, dict):
            for key, child in node.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    return 422, f"{path}: an object key contains a lone UTF-16 surrogate"
                stack.append((child, depth + 1, f"{path}.{key}"))
        else:
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(node))
    return None


def _raise_for(value: Any) -> None:
    problem = find_problem(value)
    if problem is not None:
        status, message = problem
        raise ApiError(status, message, code="too_deep" if status == 400 else "invalid_text")


def _parse(text: str | bytes) -> Any:
    """json.loads, with "too deep for the parser" as our 400 (None: not JSON at all, left to the route)."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ApiError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", code="too_deep") from exc
    except ValueError:
        return None


def screen_request() -> None:
    """before_request: refuse hostile JSON bodies and JSON-looking form fields (ApiError)."""
    if request.method not in ("POST", "PUT", "PATCH", "DELETE"):
        return
    if request.is_json:
        try:
            parsed = request.get_json(silent=True)  # cached: the route's validation reuses it
        except RecursionError as exc:
            raise ApiError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", code="too_deep") from exc
        _raise_for(parsed)
        return
    if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        for text in request.form.values():
            _raise_for(text)
            if text[:1] in ("{", "[", '"'):  # what flask-openapi3 would json.loads
                _raise_for(_parse(text))


def init_screening(app: Flask) -> None:
    app.before_request(screen_request)
