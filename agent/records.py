"""The `generations` collection: one document for every model call, failures included.

This is the research data: app, user, session, job, template name + hash, the
rendered messages, params, provider, instance, output (text or image ids), error,
latency and token usage.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database
from pymongo.errors import PyMongoError

log = logging.getLogger(__name__)


def create_generation_indexes(db: Database) -> None:
    db.generations.create_index([("app", ASCENDING), ("user", ASCENDING), ("created_at", DESCENDING)])
    db.generations.create_index([("job", ASCENDING)], sparse=True)
    db.generations.create_index([("session", ASCENDING)], sparse=True)
    db.generations.create_index([("template", ASCENDING), ("template_hash", ASCENDING)])


def _scrub(value: Any, limit: int = 4000) -> Any:
    """Keep records small: replace long base64/data URLs inside messages by a marker."""
    if isinstance(value, str):
        if value.startswith("data:image") and len(value) > 200:
            return f"<data URL, {len(value)} chars>"
        return value
    if isinstance(value, list):
        return [_scrub(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v, limit) for k, v in value.items()}
    return value


class GenerationRecorder:
    """Writes generation records; a database outage is logged, never raised into the app."""

    def __init__(self, db: Database | None) -> None:
        self.db = db

    def record(self, *, kind: str, provider: str, app: str | None = None, user: str | None = None,
               session: str | None = None, job: str | None = None, template: str | None = None,
               template_hash: str | None = None, messages: Any = None, prompt: Any = None,
               params: dict[str, Any] | None = None, output: Any = None, error: dict[str, Any] | None = None,
               latency_ms: float | None = None, usage: dict[str, Any] | None = None,
               instance: str | None = None, model: str | None = None, extra: dict[str, Any] | None = None) -> str | None:
        if self.db is None:
            return None
        doc = {
            "_id": ObjectId(), "kind": kind, "app": app, "user": user, "session": session, "job": job,
            "template": template, "template_hash": template_hash, "messages": _scrub(messages),
            "prompt": _scrub(prompt), "params": params or {}, "provider": provider, "model": model,
            "instance": instance, "output": output, "error": error, "ok": error is None,
            "latency_ms": latency_ms, "usage": usage or {}, "created_at": datetime.now(UTC), **(extra or {}),
        }
        try:
            self.db.generations.insert_one(doc)
        except PyMongoError as exc:
            log.error("could not record a %s generation (%s): %s", kind, provider, exc)
            return None
        return str(doc["_id"])
