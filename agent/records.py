"""The `generations` collection: one document for every model call, failures included.

This is the research data: app, user, session, job, step, template name + hash, the
rendered messages (image data replaced by a marker), params, provider, model,
instance, output (text, JSON or image ids), error, status, attempts, latency, token
usage and timestamps. A record is never allowed to break the call it describes: a
database problem is logged, and a document MongoDB refuses (odd keys, too large) is
stored again in a reduced form rather than lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from bson.errors import BSONError
from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database
from pymongo.errors import PyMongoError, WriteError

from agent.call_context import CallContext

log = logging.getLogger(__name__)

MAX_STRING = 200_000  # characters kept of any one string (outputs are far smaller; this stops accidents)
_REDUCIBLE = ("messages", "prompt", "params", "output", "data", "error", "repair", "retries")


def create_generation_indexes(db: Database) -> None:
    db.generations.create_index([("app", ASCENDING), ("user", ASCENDING), ("created_at", DESCENDING)])
    db.generations.create_index([("app", ASCENDING), ("created_at", DESCENDING)])
    db.generations.create_index([("job", ASCENDING)], sparse=True)
    db.generations.create_index([("session", ASCENDING)], sparse=True)
    db.generations.create_index([("template", ASCENDING), ("template_hash", ASCENDING)])
    db.generations.create_index([("kind", ASCENDING), ("ok", ASCENDING), ("created_at", DESCENDING)])


def _scrub(value: Any) -> Any:
    """Keep records small: image data (data URLs, base64 blobs) becomes a marker with its size."""
    if isinstance(value, str):
        if value.startswith("data:") and ";base64," in value[:100] and len(value) > 200:
            return f"<{value[5 : value.index(';')] or 'data'} data URL, {len(value)} chars>"
        if len(value) > MAX_STRING:
            return value[:MAX_STRING] + f"... <truncated, {len(value)} chars>"
        return value
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _scrub(v) for k, v in value.items()}
    return value


def _reduced(doc: dict[str, Any]) -> dict[str, Any]:
    """A document MongoDB refused: the free-form fields become JSON text (keeps them, loses the nesting)."""
    out = dict(doc)
    for key in _REDUCIBLE:
        if out.get(key) is not None and not isinstance(out[key], str):
            text = json.dumps(out[key], ensure_ascii=False, default=str)
            out[key] = text if len(text) <= MAX_STRING else text[:MAX_STRING] + "... <truncated>"
    out["reduced"] = True
    return out


@dataclass
class GenerationRecord:
    """One model call's record: built when the call starts, filled as it goes, saved once at its end.

    status: "ok" | "failed" | "cancelled" (None: "ok" without error, else "failed").
    `extra` holds the kind-specific fields (stream, json, retries, notes, ...), stored at the top level.
    """

    kind: str
    provider: str
    context: CallContext = field(default_factory=CallContext)
    template: str | None = None
    template_hash: str | None = None
    variant: str | None = None
    messages: Any = None
    prompt: Any = None
    params: dict[str, Any] | None = None
    model: str | None = None
    instance: str | None = None
    output: Any = None
    error: dict[str, Any] | None = None
    status: str | None = None
    attempts: int | None = None
    latency_ms: float | None = None
    usage: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def document(self, now: datetime) -> dict[str, Any]:
        """The `generations` document (field order kept: exports and studies read these)."""
        status = self.status or ("ok" if self.error is None else "failed")
        latency_ms = self.latency_ms
        return {
            "_id": ObjectId(),
            "kind": self.kind,
            **self.context.fields(),
            "template": self.template,
            "template_hash": self.template_hash,
            "variant": self.variant,
            "messages": _scrub(self.messages),
            "prompt": _scrub(self.prompt),
            "params": _scrub(self.params or {}),
            "provider": self.provider,
            "model": self.model,
            "instance": self.instance,
            "output": _scrub(self.output),
            "error": _scrub(self.error),
            "status": status,
            "ok": status == "ok",
            "attempts": self.attempts,
            "latency_ms": latency_ms,
            "usage": self.usage or {},
            "started_at": now - timedelta(milliseconds=latency_ms) if latency_ms else now,
            "created_at": now,
            **_scrub(self.extra or {}),
        }


class GenerationRecorder:
    """Writes generation records; a database outage is logged, never raised into the app."""

    def __init__(self, db: Database | None) -> None:
        self.db = db
        # annotators add fields before the insert (study, condition, cost); observers see the stored
        # document (metrics). Both are wired by apps/core/studies.py; a failing hook is logged only.
        self.annotators: list[Callable[[dict[str, Any]], dict[str, Any]]] = []
        self.observers: list[Callable[[dict[str, Any]], None]] = []

    def save(self, record: GenerationRecord) -> str | None:
        """Insert one record; returns its id (str), or None when there is no database or it failed."""
        if self.db is None:
            return None
        kind, provider = record.kind, record.provider
        doc = record.document(datetime.now(UTC))
        for annotate in self.annotators:
            try:
                doc.update(annotate(doc))
            except Exception:  # noqa: BLE001 - a hook must never cost the record
                log.exception("a generation record annotator failed")
        try:
            self.db.generations.insert_one(doc)
        except (
            BSONError,
            WriteError,
        ) as exc:  # keys with '$'/'.', a document over 16 MB, an unencodable value
            log.warning("a %s record was refused (%s); storing it reduced", kind, exc)
            try:
                self.db.generations.insert_one(_reduced(doc))
            except (PyMongoError, BSONError) as exc2:
                log.error("could not record a %s generation (%s): %s", kind, provider, exc2)
                return None
        except PyMongoError as exc:
            log.error("could not record a %s generation (%s): %s", kind, provider, exc)
            return None
        for observe in self.observers:
            try:
                observe(doc)
            except Exception:  # noqa: BLE001 - metrics must never cost the call
                log.exception("a generation record observer failed")
        return str(doc["_id"])
