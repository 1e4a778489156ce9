"""JSON replies: parse a model's text (code fences and prose tolerated), check it against a JSON Schema."""

from __future__ import annotations

import functools
import json
from typing import Any

import jsonschema

from agent.types import ChatResult

_FENCE_OPEN = "```"


def parse_json_text(text: str) -> Any:
    """Parse a model's JSON reply, tolerating code fences and prose around one object/array."""
    candidate = (text or "").strip()
    if candidate.startswith(_FENCE_OPEN):
        first_newline = candidate.find("\n")
        body = candidate[first_newline + 1 :] if first_newline >= 0 else candidate[3:]
        end = body.rfind(_FENCE_OPEN)
        candidate = (body[:end] if end >= 0 else body).strip()
    try:
        return json.loads(candidate)
    except json.JSONDecodeError:
        starts = [i for i in (candidate.find("{"), candidate.find("[")) if i >= 0]
        if not starts:
            raise
        start = min(starts)
        end = max(candidate.rfind("}"), candidate.rfind("]"))
        if end <= start:
            raise
        return json.loads(candidate[start : end + 1])


def schema_problem(value: Any, schema: dict[str, Any]) -> str | None:
    """None when `value` validates, else a short description of (up to three of) the errors."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(
        validator.iter_errors(value), key=lambda e: (len(e.absolute_path), list(map(str, e.path)))
    )
    if not errors:
        return None
    parts = []
    for err in errors[:3]:
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        parts.append(f"{where}: {err.message[:200]}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def check_schema(schema: dict[str, Any]) -> None:
    """A ValueError for a schema that is not a valid JSON Schema (the caller's bug, before any call).

    Checked once per distinct schema (its JSON text): the metaschema check costs ~1 ms, and every chat
    that wants JSON asks again with the same few schemas."""
    try:
        text = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid JSON schema for chat(): not JSON ({exc})") from exc
    problem = _schema_problem_of(text)
    if problem is not None:
        raise ValueError(f"invalid JSON schema for chat(): {problem}")


@functools.lru_cache(maxsize=256)
def _schema_problem_of(text: str) -> str | None:
    schema = json.loads(text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return str(exc.message)
    return None


def checked(result: ChatResult, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """(value, problem): the reply's JSON (the provider's parsed `data`, else its text) and what is wrong."""
    if result.data is not None:
        return result.data, schema_problem(result.data, schema)
    try:
        value = parse_json_text(result.text)
    except (json.JSONDecodeError, ValueError) as exc:
        return None, f"not JSON ({exc})"
    return value, schema_problem(value, schema)


def repair_request(problem: str, schema: dict[str, Any]) -> str:
    """The user message asking once for a corrected reply."""
    return (
        f"That reply was not valid: {problem}. Reply again with only JSON that matches this "
        f"JSON Schema, no prose and no code fences:\n{json.dumps(schema, ensure_ascii=False)}"
    )
