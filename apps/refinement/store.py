"""MongoDB state of the refinement app: participants, sessions, requests, stimuli, versions.

- `refinement_users`: the original's `users` document per participant (unique username;
  created by an upsert, so two concurrent /paint/start calls cannot make two documents).
- `refinement_sessions`: one per /paint/start (`_id` = the session id we hand out).
- `refinement_requests`: one per /generate call, done or failed: inputs (sketches as image
  ids), every step with template + hash + generation id + timing, what it produced.
- `refinement_stimuli`: one per generated creative (type 2: the names + recommendation),
  with image ids, the text chain that led to it and its provenance.
- `refinement_versions`: img2img / inpaint results, each linked to its parent image.
- `refinement_saves`: a small log line per /paint/save (no sketches).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from apps.core.storage import absolute_image_url

from . import labels as L

COLLECTIONS = (
    "refinement_users",
    "refinement_sessions",
    "refinement_requests",
    "refinement_stimuli",
    "refinement_versions",
    "refinement_saves",
)

FRESH_USER: dict[str, Any] = {
    "currentStage": L.STAGE_NOT_READY,
    "designTask": "",
    "rapidDivergenceSchemes": [],
    "deepDivergenceSchemes": [],
    "convergenceSchemes": [],
}
USER_FIELDS = (
    "username",
    "currentStage",
    "designTask",
    "rapidDivergenceSchemes",
    "deepDivergenceSchemes",
    "convergenceSchemes",
)


def create_indexes(db: Database) -> None:
    db.refinement_users.create_index("username", unique=True)
    db.refinement_sessions.create_index([("username", ASCENDING), ("created_at", DESCENDING)])
    db.refinement_sessions.create_index([("client", ASCENDING), ("created_at", DESCENDING)])
    db.refinement_requests.create_index([("username", ASCENDING), ("created_at", DESCENDING)])
    db.refinement_requests.create_index([("session", ASCENDING), ("created_at", DESCENDING)])
    db.refinement_stimuli.create_index([("username", ASCENDING), ("_id", DESCENDING)])
    db.refinement_stimuli.create_index([("session", ASCENDING), ("_id", DESCENDING)])
    db.refinement_stimuli.create_index("request_id")
    db.refinement_stimuli.create_index("images.id")
    db.refinement_versions.create_index([("root", ASCENDING), ("created_at", ASCENDING)])
    db.refinement_versions.create_index("parent")
    db.refinement_saves.create_index([("username", ASCENDING), ("created_at", DESCENDING)])


def now() -> datetime:
    return datetime.now(UTC)


def iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat().replace("+00:00", "Z")
    return value


# ------------------------------------------------------------------ users
def ensure_user(db: Database, username: str) -> dict[str, Any]:
    """Find or create the participant's document in one atomic upsert (the original raced)."""
    for attempt in range(3):
        try:
            db.refinement_users.update_one(
                {"username": username},
                {"$setOnInsert": {"username": username, **FRESH_USER, "created_at": now()}},
                upsert=True,
            )
            break
        except DuplicateKeyError:  # two upserts raced on the unique index: the other one inserted it
            if attempt == 2:
                raise
    doc = db.refinement_users.find_one({"username": username})
    assert doc is not None
    return doc


def public_user(doc: dict[str, Any], session_id: str) -> dict[str, Any]:
    """The original's /paint/start data (arrays never null) plus our session id."""
    out: dict[str, Any] = {"_id": str(doc["_id"])}
    for key in USER_FIELDS:
        value = doc.get(key, FRESH_USER.get(key))
        if key.endswith("Schemes") and not isinstance(value, list):
            value = []
        out[key] = value
    out["sessionId"] = session_id
    return out


# one message per kind for "missing" and "not yours" alike: the 404 bodies must not tell them apart
SESSION_NOT_FOUND = "session not found"
STIMULUS_NOT_FOUND = "stimulus not found"
REQUEST_NOT_FOUND = "request not found"


# ------------------------------------------------------------------ shaping stored docs for the history API
def history_item(stored: dict[str, Any], base_url: str | None) -> dict[str, Any]:
    image_id = stored.get("image_id")
    combos = stored.get("combinations")
    return {
        "type": stored["type"],
        "text": stored.get("text"),
        "imageId": image_id,
        "imageUrl": absolute_image_url(image_id, base_url) if image_id else None,
        "combinations": [history_item(c, base_url) for c in combos] if combos is not None else None,
    }


def public_stimulus(doc: dict[str, Any], base_url: str | None) -> dict[str, Any]:
    images = []
    for img in doc.get("images") or []:
        images.append(
            {
                **{k: v for k, v in img.items() if k != "id"},
                "imageId": img["id"],
                "imageUrl": absolute_image_url(img["id"], base_url),
            }
        )
    return {
        "id": str(doc["_id"]),
        "requestId": doc["request_id"],
        "username": doc.get("username"),
        "sessionId": doc.get("session"),
        "attribution": doc.get("attribution", "anonymous"),
        "type": doc["gen_type"],
        "stage": doc["stage"],
        "index": doc.get("index", 0),
        "creativeType": doc.get("creative_type"),
        "displayType": doc.get("display_type"),
        "items": [history_item(i, base_url) for i in doc.get("items") or []],
        "result": doc.get("result"),
        "texts": doc.get("texts") or {},
        "images": images,
        "provenance": doc.get("provenance") or {},
        "language": doc.get("language", ""),
        "createdAt": iso(doc.get("created_at")),
    }


def public_request(doc: dict[str, Any], base_url: str | None) -> dict[str, Any]:
    return {
        "id": str(doc["_id"]),
        "username": doc.get("username"),
        "sessionId": doc.get("session"),
        "attribution": doc.get("attribution"),
        "type": doc.get("gen_type"),
        "stage": doc.get("stage"),
        "language": doc.get("language"),
        "status": doc.get("status"),
        "error": doc.get("error"),
        "input": doc.get("input"),
        "sketches": [
            {"imageId": i, "imageUrl": absolute_image_url(i, base_url)} for i in doc.get("sketch_ids") or []
        ],
        "steps": doc.get("steps") or [],
        "stimulusIds": doc.get("stimulus_ids") or [],
        "imageIds": doc.get("image_ids") or [],
        "durationMs": doc.get("duration_ms"),
        "createdAt": iso(doc.get("created_at")),
        "finishedAt": iso(doc.get("finished_at")),
    }


def session_summaries(db: Database, sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sessions with their request (done/failed), stimulus and save counts (two aggregations for all)."""
    ids = [s["_id"] for s in sessions]
    requests: dict[str, dict[str, int]] = {}
    for row in db.refinement_requests.aggregate(
        [
            {"$match": {"session": {"$in": ids}}},
            {"$group": {"_id": {"session": "$session", "status": "$status"}, "n": {"$sum": 1}}},
        ]
    ):
        entry = requests.setdefault(row["_id"]["session"], {})
        entry[row["_id"]["status"]] = row["n"]
    stimuli = {
        row["_id"]: row["n"]
        for row in db.refinement_stimuli.aggregate(
            [
                {"$match": {"session": {"$in": ids}}},
                {"$group": {"_id": "$session", "n": {"$sum": 1}}},
            ]
        )
    }
    out = []
    for s in sessions:
        counts = requests.get(s["_id"], {})
        out.append(
            {
                "sessionId": s["_id"],
                "username": s["username"],
                "createdAt": iso(s.get("created_at")),
                "lastSeenAt": iso(s.get("last_seen_at")),
                "requests": sum(counts.values()),
                "failedRequests": counts.get("failed", 0),
                "stimuli": stimuli.get(s["_id"], 0),
                "saves": s.get("saves", 0),
            }
        )
    return out
