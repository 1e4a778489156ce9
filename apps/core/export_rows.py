"""Helpers of `flask export` for studies: filters (session, until, condition), derived columns
(tokens, cost), image rows joined with their generation record, and a progress line.

Kept apart from apps/core/export.py so that module stays the small, stable writer; everything a
study adds to a row or a query is here.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from pymongo.database import Database

from agent.prices import Price, cost, tokens
from agent.studies import PARTICIPANTS

IMAGE_COLUMNS = (
    "id", "file", "created_at", "app", "user", "session", "job", "step", "kind", "study", "condition",
    "template", "template_hash", "prompt", "negative_prompt", "provider", "instance", "checkpoint", "sampler",
    "steps", "cfg_scale", "seed", "width", "height", "bytes", "sha256", "latency_ms", "generation", "missing",
)  # fmt: skip


def session_filter(session: str) -> dict[str, Any]:
    """A session's documents: those with `session` = S, or the document whose id is S (a storybook's
    book and job, a storyteller session), so one filter fits every collection."""
    return {"$or": [{"session": session}, {"_id": session}]}


def time_filter(field: str, since: datetime | None, until: datetime | None) -> dict[str, Any]:
    bounds = {**({"$gte": since} if since else {}), **({"$lt": until} if until else {})}
    return {field: bounds} if bounds else {}


def condition_filter(
    db: Database, condition: str, study: str | None, user_field: str | None, has_condition: bool
) -> dict[str, Any]:
    """Documents of one condition: by their own `condition` field (generations, jobs), else by
    belonging to a participant assigned to it (app collections carry no condition)."""
    if has_condition:
        return {"condition": condition}
    query: dict[str, Any] = {"condition": condition}
    if study:
        query["study"] = study
    users, sessions = [], []
    for doc in db[PARTICIPANTS].find(query, {"participant": 1, "kind": 1}):
        (sessions if doc.get("kind") == "session" else users).append(doc["participant"])
    ors: list[dict[str, Any]] = [{"session": {"$in": sessions}}, {"_id": {"$in": sessions}}]
    if user_field:
        ors.append({user_field: {"$in": users}})
    return {"$or": ors}


def generation_row(prices: dict[str, Price]) -> Any:
    """Adds prompt/completion/total tokens and (with a price table) cost_usd to a generation row."""

    def enrich(row: dict[str, Any]) -> dict[str, Any]:
        usage = row.get("usage") if isinstance(row.get("usage"), dict) else None
        prompt, completion = tokens(usage)
        row["prompt_tokens"], row["completion_tokens"] = prompt, completion
        row["total_tokens"] = (usage or {}).get("total_tokens", prompt + completion)
        if row.get("cost_usd") is None and prices:
            row["cost_usd"] = cost(prices, row.get("model"), usage)
        return row

    return enrich


def image_records(db: Database, ids: list[Any]) -> dict[str, dict[str, Any]]:
    """image id -> the `generations` record that made it (kind image, output.image_id)."""
    out: dict[str, dict[str, Any]] = {}
    if ids:
        for rec in db.generations.find({"kind": "image", "output.image_id": {"$in": ids}}):
            out[str(rec["output"]["image_id"])] = rec
    return out


def image_row(doc: dict[str, Any], rec: dict[str, Any] | None) -> dict[str, Any]:
    """One image: its GridFS metadata joined with what its generation record says (as recorded)."""
    meta = doc.get("metadata") or {}
    rec = rec or {}
    params = rec.get("params") if isinstance(rec.get("params"), dict) else {}
    prompt = rec.get("prompt") if isinstance(rec.get("prompt"), dict) else {}
    output = rec.get("output") if isinstance(rec.get("output"), dict) else {}
    seed = output.get("seed")
    return {
        "id": doc["_id"], "file": doc.get("file"), "created_at": doc.get("uploadDate"),
        "app": meta.get("app"), "user": meta.get("user"), "session": meta.get("session") or rec.get("session"),
        "job": meta.get("job"), "step": meta.get("step") or rec.get("step"), "kind": meta.get("kind"),
        "study": rec.get("study"), "condition": rec.get("condition"),
        "template": rec.get("template") or meta.get("template"), "template_hash": rec.get("template_hash"),
        "prompt": prompt.get("prompt") or meta.get("prompt"), "negative_prompt": prompt.get("negative_prompt"),
        "provider": meta.get("provider") or rec.get("provider"), "instance": meta.get("instance") or rec.get("instance"),
        "checkpoint": params.get("checkpoint"), "sampler": params.get("sampler"), "steps": params.get("steps"),
        "cfg_scale": params.get("cfg_scale"), "seed": seed if seed not in (None, -1) else params.get("seed"),
        "width": meta.get("width"), "height": meta.get("height"), "bytes": doc.get("length"),
        "sha256": meta.get("sha256"), "latency_ms": rec.get("latency_ms"),
        "generation": rec.get("_id"), "missing": doc.get("missing"),
    }  # fmt: skip


def utc(value: datetime) -> datetime:
    """Stored dates are UTC; a naive one (a client without tz_aware) gets its zone back."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class Progress:
    """`name 120/300` on one terminal line (stderr, only on a tty), at most 5 updates a second."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._last = 0.0

    def update(self, name: str, done: int, total: int | None, *, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._last < 0.2:
            return
        self._last = now
        of = f"/{total}" if total is not None else ""
        width = 30
        bar = ""
        if total:
            filled = int(width * min(done, total) / total)
            bar = "[" + "#" * filled + "." * (width - filled) + "] "
        self.stream.write(f"\r{bar}{name} {done}{of}" + ("\n" if final else ""))
        self.stream.flush()
