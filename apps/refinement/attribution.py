"""Who made a refinement call: the caller as the route resolved it, and whose stimuli a /generate makes.

The original frontend sends no user on /generate, so we use, in order: the authenticated user
(AUTH_MODE on); `username` / `sessionId` in the body, in `prompts` or in the X-Username /
X-Session-Id headers (a patched frontend, other clients); else the latest /paint/start session
from the same client (address + user agent) within SESSION_INFER_HOURS, marked
`attribution: "inferred"`; else `anonymous`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from pymongo.database import Database

from apps.core.envelope import BusinessException

from . import store

SESSION_INFER_HOURS = 12


@dataclass(frozen=True)
class Client:
    """Where a request came from (hashed: only used to link /generate calls to a /paint/start)."""

    key: str | None
    user_agent: str | None = None

    @classmethod
    def from_parts(cls, address: str | None, user_agent: str | None) -> Client:
        if not address:
            return cls(None, user_agent)
        digest = hashlib.sha256(f"{address}|{user_agent or ''}".encode()).hexdigest()[:20]
        return cls(digest, (user_agent or "")[:300] or None)


@dataclass(frozen=True)
class Caller:
    """The request's caller, resolved by the route so that the services need no Flask globals."""

    auth_user: str | None  # the authenticated user's name (AUTH_MODE on), else None
    client: Client
    base_url: str  # for absolute image URLs
    check_owner: Callable[[str | None, str], None]  # 404 with the message unless the caller may see it
    username_header: str | None = None  # X-Username
    session_header: str | None = None  # X-Session-Id


@dataclass(frozen=True)
class Who:
    username: str | None
    session: str | None
    attribution: str  # auth | explicit | inferred | anonymous


def attribute(db: Database, caller: Caller, username: str | None, session_id: str | None) -> Who:
    """Whose stimuli these are; `username` / `session_id`: what the request names (body or prompts)."""
    username = username or caller.username_header or None
    session_id = session_id or caller.session_header or None
    kind = "auth" if caller.auth_user else "explicit"
    name = caller.auth_user or username or None
    if session_id:
        owner = store.session_owner(db, session_id)
        if owner is None or (name and owner != name):
            raise BusinessException(1, f"unknown sessionId {session_id}", status=404)
        return Who(owner, session_id, kind)
    if name:
        return Who(name, store.latest_session_id(db, name), kind)
    if caller.client.key:
        since = store.now() - timedelta(hours=SESSION_INFER_HOURS)
        doc = store.latest_client_session(db, caller.client.key, since)
        if doc is not None:
            return Who(doc["username"], doc["_id"], "inferred")
    return Who(None, None, "anonymous")
