"""MongoDB state of the refinement app: every read and write of its collections.

- `refinement_users`: the original's `users` document per participant (unique username;
  created by an upsert, so two concurrent /paint/start calls cannot make two documents).
- `refinement_sessions`: one per /paint/start (`_id` = the session id we hand out).
- `refinement_requests`: one per /generate call, done or failed: inputs (sketches as image
  ids), every step with template + hash + generation id + timing, what it produced.
- `refinement_stimuli`: one per generated creative (type 2: the names + recommendation),
  with image ids, the text chain that led to it and its provenance.
- `refinement_versions`: img2img / inpaint results, each linked to its parent image.
- `refinement_saves`: a small log line per /paint/save (no sketches).

The services decide what to store; this module is the only one that names a collection, so
a query's shape and its index sit side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError
from pymongo.results import UpdateResult

from . import labels

log = logging.getLogger(__name__)

USERS = "refinement_users"
SESSIONS = "refinement_sessions"
REQUESTS = "refinement_requests"
STIMULI = "refinement_stimuli"
COUNTED = "counted"  # a session document that keeps its own counts (`count_run`)
VERSIONS = "refinement_versions"
SAVES = "refinement_saves"
EXPORT_COLLECTIONS = [USERS, SESSIONS, REQUESTS, STIMULI, VERSIONS, SAVES]  # all keyed by `username`
IMAGE_FILES = "images.files"  # GridFS metadata of apps/core/storage (read here to find a run's images)

FRESH_USER: dict[str, Any] = {
    "currentStage": labels.STAGE_NOT_READY,
    "designTask": "",
    "rapidDivergenceSchemes": [],
    "deepDivergenceSchemes": [],
    "convergenceSchemes": [],
}


def create_indexes(db: Database) -> None:
    db[USERS].create_index("username", unique=True)
    db[SESSIONS].create_index([("username", ASCENDING), ("created_at", DESCENDING)])
    db[SESSIONS].create_index([("client", ASCENDING), ("created_at", DESCENDING)])
    db[REQUESTS].create_index([("username", ASCENDING), ("created_at", DESCENDING)])
    db[REQUESTS].create_index([("session", ASCENDING), ("created_at", DESCENDING)])
    db[STIMULI].create_index([("username", ASCENDING), ("_id", DESCENDING)])
    db[STIMULI].create_index([("session", ASCENDING), ("_id", DESCENDING)])
    db[STIMULI].create_index("request_id")
    db[STIMULI].create_index("images.id")
    db[VERSIONS].create_index([("root", ASCENDING), ("created_at", ASCENDING)])
    db[VERSIONS].create_index("parent")
    db[SAVES].create_index([("username", ASCENDING), ("created_at", DESCENDING)])


def now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------ users and sessions
def ensure_user(db: Database, username: str) -> dict[str, Any]:
    """Find or create the participant's document in one atomic upsert (the original raced)."""
    for attempt in range(3):
        try:
            db[USERS].update_one(
                {"username": username},
                {"$setOnInsert": {"username": username, **FRESH_USER, "created_at": now()}},
                upsert=True,
            )
            break
        except DuplicateKeyError:  # two upserts raced on the unique index: the other one inserted it
            if attempt == 2:
                raise
    doc = db[USERS].find_one({"username": username})
    assert doc is not None
    return doc


def update_user(db: Database, username: str, fields: dict[str, Any]) -> UpdateResult:
    return db[USERS].update_one({"username": username}, {"$set": fields})


def insert_session(db: Database, doc: dict[str, Any]) -> None:
    """A new session keeps its own request and stimulus counts (`counted`, see `count_run`)."""
    db[SESSIONS].insert_one({**doc, COUNTED: True})


def latest_session_id(db: Database, username: str) -> str | None:
    doc = db[SESSIONS].find_one({"username": username}, {"_id": 1}, sort=[("created_at", DESCENDING)])
    return doc["_id"] if doc else None


def session_owner(db: Database, session_id: str) -> str | None:
    doc = db[SESSIONS].find_one({"_id": session_id}, {"username": 1})
    return doc["username"] if doc else None


def latest_client_session(db: Database, client: str, since: datetime) -> dict[str, Any] | None:
    """The newest session started from this client (address + user agent hash) since `since`."""
    return db[SESSIONS].find_one(
        {"client": client, "created_at": {"$gte": since}}, {"username": 1}, sort=[("created_at", DESCENDING)]
    )


def count_save(db: Database, session_id: str) -> None:
    db[SESSIONS].update_one({"_id": session_id}, {"$inc": {"saves": 1}, "$set": {"last_seen_at": now()}})


def count_run(db: Database, session_id: str, status: str, stimuli: int = 0) -> None:
    """One more request with `status` (and its stimuli) on the session, and it was seen now: one update.

    Why: listing a participant's sessions used to count each session's requests and stimuli with two
    aggregations over those collections, the slowest read of a study (tens of ms of database time with a
    few hundred stimuli). A session created before the counters (no `counted`) is still counted that way,
    since its counters would miss what came before (`session_counts`)."""
    inc = {f"counts.{status}": 1}
    if stimuli:
        inc["counts.stimuli"] = stimuli
    db[SESSIONS].update_one({"_id": session_id}, {"$inc": inc, "$set": {"last_seen_at": now()}})


def count_failed_quietly(db: Database, session_id: str | None) -> None:
    """`count_run` for a failed request; a database failure here is logged (the caller is already failing)."""
    if not session_id:
        return
    try:
        count_run(db, session_id, "failed")
    except PyMongoError as exc:
        log.error("could not count a failed request on session %s: %s", session_id, exc)


def insert_save(db: Database, doc: dict[str, Any]) -> None:
    db[SAVES].insert_one(doc)


def find_session(db: Database, session_id: str) -> dict[str, Any] | None:
    return db[SESSIONS].find_one({"_id": session_id})


def user_sessions(db: Database, username: str, limit: int) -> list[dict[str, Any]]:
    return list(db[SESSIONS].find({"username": username}).sort("created_at", DESCENDING).limit(limit))


def session_counts(
    db: Database, sessions: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(session -> {request status: n}, session -> stimuli): from the sessions' own counters, and for
    sessions older than those (no `counted`) in two aggregations."""
    requests: dict[str, dict[str, int]] = {}
    stimuli: dict[str, int] = {}
    for s in sessions:
        if s.get(COUNTED):
            counts = dict(s.get("counts") or {})
            stimuli[s["_id"]] = int(counts.pop("stimuli", 0))
            requests[s["_id"]] = {status: int(n) for status, n in counts.items()}
    session_ids = [s["_id"] for s in sessions if not s.get(COUNTED)]
    if not session_ids:
        return requests, stimuli
    for row in db[REQUESTS].aggregate(
        [
            {"$match": {"session": {"$in": session_ids}}},
            {"$group": {"_id": {"session": "$session", "status": "$status"}, "n": {"$sum": 1}}},
        ]
    ):
        requests.setdefault(row["_id"]["session"], {})[row["_id"]["status"]] = row["n"]
    for row in db[STIMULI].aggregate(
        [{"$match": {"session": {"$in": session_ids}}}, {"$group": {"_id": "$session", "n": {"$sum": 1}}}]
    ):
        stimuli[row["_id"]] = row["n"]
    return requests, stimuli


# ------------------------------------------------------------------ requests and stimuli
def insert_request_quietly(db: Database, doc: dict[str, Any]) -> None:
    """Record a failed request; a database failure here is logged (the caller is already failing)."""
    try:
        db[REQUESTS].insert_one(doc)
    except PyMongoError as exc:
        log.error("could not record failed request %s: %s", doc.get("_id"), exc)


def insert_stimuli(db: Database, docs: list[dict[str, Any]]) -> None:
    if docs:
        db[STIMULI].insert_many(docs, ordered=True)


def insert_request(db: Database, doc: dict[str, Any]) -> None:
    db[REQUESTS].insert_one(doc)


def delete_run(db: Database, request_id: str) -> None:
    """Undo a run whose records could not all be written: its stimuli and its `done` request line."""
    db[STIMULI].delete_many({"request_id": request_id})
    db[REQUESTS].delete_one({"_id": request_id, "status": "done"})


def find_request(db: Database, request_id: str) -> dict[str, Any] | None:
    return db[REQUESTS].find_one({"_id": request_id})


def session_requests(db: Database, session_id: str, limit: int = 500) -> list[dict[str, Any]]:
    return list(db[REQUESTS].find({"session": session_id}).sort("created_at", DESCENDING).limit(limit))


def find_stimulus(db: Database, stimulus_id: str) -> dict[str, Any] | None:
    return db[STIMULI].find_one({"_id": stimulus_id})


def stimuli_page(db: Database, flt: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """Newest first, one more than `limit` (so the caller knows whether there is a next page)."""
    return list(db[STIMULI].find(flt).sort("_id", DESCENDING).limit(limit + 1))


def stimulus_with_image(db: Database, image_id: str) -> dict[str, Any] | None:
    return db[STIMULI].find_one({"images.id": image_id}, {"images": 1, "username": 1, "session": 1})


# ------------------------------------------------------------------ versions
def find_version(db: Database, image_id: str) -> dict[str, Any] | None:
    return db[VERSIONS].find_one({"_id": image_id})


def insert_versions(db: Database, docs: list[dict[str, Any]]) -> None:
    db[VERSIONS].insert_many(docs, ordered=True)


def delete_batch(db: Database, batch: str) -> None:
    db[VERSIONS].delete_many({"batch": batch})


def tree_versions(db: Database, root_id: str, limit: int) -> list[dict[str, Any]]:
    return list(db[VERSIONS].find({"root": root_id}).sort("created_at", ASCENDING).limit(limit))


# ------------------------------------------------------------------ images of a run (GridFS metadata)
def job_image_ids(db: Database, job: str) -> Iterator[Any]:
    """The ids of every image refinement stored for one run or refine batch (`metadata.job`)."""
    for doc in db[IMAGE_FILES].find({"metadata.job": job, "metadata.app": labels.APP}, {"_id": 1}):
        yield doc["_id"]
