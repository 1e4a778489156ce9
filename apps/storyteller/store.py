"""MongoDB state of the storyteller: sessions, every story version, and "Good story" feedback.

- `storyteller_sessions`: one per browser tab / client: the submitted settings, the pending
  part rewrite, the current version and counters. Replaces the original's global prompt.
- `storyteller_versions`: every text the user saw or made, with what produced it (settings,
  rendered prompt, template name + hash, model, parent version, kind).
- `storyteller_feedback`: one document per liked version: the exact prompt and story shown.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.database import Database

SESSIONS = "storyteller_sessions"
VERSIONS = "storyteller_versions"
FEEDBACK = "storyteller_feedback"

EXPORTED = (SESSIONS, VERSIONS, FEEDBACK)  # `flask export --app storyteller`, by "user"


def create_indexes(db: Database) -> None:
    db[SESSIONS].create_index([("client", ASCENDING), ("updated_at", DESCENDING)])
    db[SESSIONS].create_index([("user", ASCENDING), ("updated_at", DESCENDING)])
    db[VERSIONS].create_index([("session", ASCENDING), ("n", ASCENDING)])
    db[VERSIONS].create_index([("user", ASCENDING), ("created_at", DESCENDING)])
    db[FEEDBACK].create_index([("version", ASCENDING)], unique=True)
    db[FEEDBACK].create_index([("good", ASCENDING), ("created_at", ASCENDING)])


def now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return secrets.token_urlsafe(16)


class StoryStore:
    """Thin data access; the service decides what to write."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.sessions = db[SESSIONS]
        self.versions = db[VERSIONS]
        self.feedback = db[FEEDBACK]
        # sessions made by this request but not written yet: a call that fails or is refused
        # leaves no empty session behind (the first real write inserts it)
        self._drafts: dict[str, dict[str, Any]] = {}

    # ---- sessions
    def session(self, session_id: str) -> dict[str, Any] | None:
        return self.sessions.find_one({"_id": session_id})

    def create_session(
        self, session_id: str | None, *, user: str | None, client: str | None
    ) -> dict[str, Any]:
        """A new session, written only when something is first stored in it (see `_materialize`)."""
        at = now()
        doc = {
            "_id": session_id or new_id(),
            "user": user,
            "client": client,
            "created_at": at,
            "updated_at": at,
            "settings": None,
            "story": None,
            "pending": None,
            "current_version": None,
            "version_seq": 0,
            "generated": 0,
            "cancel_seq": 0,
        }
        self._drafts[doc["_id"]] = dict(doc)
        return doc

    def is_draft(self, session_id: str) -> bool:
        return session_id in self._drafts

    def _materialize(self, session_id: str) -> None:
        """Insert this request's draft session before the first write that needs it."""
        draft = self._drafts.pop(session_id, None)
        if draft is not None:
            self.sessions.insert_one(draft)

    def latest_session(self, *, client: str | None, user: str | None) -> dict[str, Any] | None:
        query: dict[str, Any] = {"user": user} if user else {"client": client}
        return self.sessions.find_one(query, sort=[("updated_at", DESCENDING)])

    def update_session(
        self,
        session_id: str,
        fields: dict[str, Any],
        *,
        inc: dict[str, int] | None = None,
        client: str | None = None,
    ) -> None:
        update: dict[str, Any] = {
            "$set": {**fields, "updated_at": now(), **({"client": client} if client else {})}
        }
        if inc:
            update["$inc"] = inc
        self._materialize(session_id)
        self.sessions.update_one({"_id": session_id}, update)

    def cancel_seq(self, session_id: str) -> int:
        doc = self.sessions.find_one({"_id": session_id}, {"cancel_seq": 1})
        return int((doc or {}).get("cancel_seq", 0))

    # ---- versions
    def add_version(self, session: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        """Insert a version numbered within its session and make it the session's current one."""
        self._materialize(session["_id"])
        counted = self.sessions.find_one_and_update(
            {"_id": session["_id"]},
            {"$inc": {"version_seq": 1}},
            projection={"version_seq": 1},
            return_document=ReturnDocument.AFTER,
        )
        version = {
            "_id": new_id(),
            "session": session["_id"],
            "user": session.get("user"),
            "n": int(counted["version_seq"]) if counted else 1,
            "created_at": now(),
            "feedback": None,
            **doc,
        }
        self.versions.insert_one(version)
        self.update_session(session["_id"], {"current_version": version["_id"]})
        return version

    def version(self, version_id: str) -> dict[str, Any] | None:
        return self.versions.find_one({"_id": version_id})

    def history(self, session_id: str) -> list[dict[str, Any]]:
        return list(self.versions.find({"session": session_id}, sort=[("n", ASCENDING)]))

    # ---- feedback
    def save_feedback(self, version: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        """One feedback document per version (liking twice updates it)."""
        at = now()
        saved = self.feedback.find_one_and_update(
            {"version": version["_id"]},
            {"$set": {**doc, "updated_at": at}, "$setOnInsert": {"_id": new_id(), "created_at": at}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        self.versions.update_one(
            {"_id": version["_id"]},
            {"$set": {"feedback": {"good": doc.get("good", True), "id": saved["_id"], "at": at}}},
        )
        return saved

    def positive_feedback(
        self, *, user: str | None = None, since: datetime | None = None
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"good": True}
        if user:
            query["user"] = user
        if since:
            query["created_at"] = {"$gte": since}
        return list(self.feedback.find(query, sort=[("created_at", ASCENDING)]))
