"""A per-user, per-UTC-day cap on model calls (MODEL_DAILY_CALL_CAP), counted from `generations`.

Why count the research log instead of keeping a counter: every model call (chat,
stream, image; failures too, because they cost as well) is already written to
`generations` with its user, so the cap needs no extra write on the hot path and can
never disagree with what the study data shows. Moderation calls are free and not
counted.

The cap is checked when a request that starts model work arrives (the same
predicate as the stricter rate limit); a job already running finishes even if it
crosses the cap. It applies only when auth is on: with AUTH_MODE=none the user is
whatever name the frontend sends, so a cap would be a formality (the per-IP rate
limits still apply). Admins are exempt. A capped request gets 429 with the time the
cap resets (next UTC midnight) in the message and in `Retry-After`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from flask import Flask
from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database

from config import Settings

from .auth import authenticate
from .context import services
from .errors import ApiError


def create_indexes(db: Database) -> None:
    db.generations.create_index([("user", ASCENDING), ("created_at", DESCENDING)])


def day_window(now: datetime | None = None) -> tuple[datetime, datetime]:
    """(start of today, start of tomorrow) in UTC."""
    now = now or datetime.now(UTC)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


def calls_today(db: Database, user: str, now: datetime | None = None) -> int:
    start, end = day_window(now)
    return db.generations.count_documents(
        {"user": user, "created_at": {"$gte": start, "$lt": end}, "kind": {"$ne": "moderation"}}
    )


def check_daily_cap(db: Database, user: str, cap: int, now: datetime | None = None) -> None:
    """Raise 429 when `user` has made `cap` model calls today."""
    if cap <= 0:
        return
    now = now or datetime.now(UTC)
    used = calls_today(db, user, now)
    if used < cap:
        return
    _, reset = day_window(now)
    seconds = max(1, math.ceil((reset - now).total_seconds()))
    raise ApiError(
        429,
        f"daily model-call cap reached for {user} ({used} of {cap} calls today); "
        f"it resets at {reset.strftime('%Y-%m-%dT%H:%M:%SZ')} (in {seconds} s)",
        code="daily_cap_reached",
        headers={"Retry-After": str(seconds)},
    )


def init_spend_cap(app: Flask, settings: Settings, is_generation: Callable[[], bool]) -> None:
    if settings.MODEL_DAILY_CALL_CAP <= 0 or settings.AUTH_MODE == "none":
        return

    @app.before_request
    def _daily_cap() -> None:
        if not is_generation():
            return

        user = authenticate()  # 401 here when the credentials are wrong
        if user is None or user.is_admin:
            return
        check_daily_cap(services().db, user.name, settings.MODEL_DAILY_CALL_CAP)
