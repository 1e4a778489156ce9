"""Who uploaded an image when the request does not say (StepIdeator's cloud button, auth off).

StepIdeator's frontend sends its participant id ("实验编号") as `username` in `/generate` and
`/timeRecord`, but its uploads (`/upload`, `/uploadImage`) carry only the file. With auth on the
caller is the authenticated user and nothing here is needed. With auth off an upload is linked to
the participant by the browser it came from: a client key (a hash of the remote address and
User-Agent, never stored raw) is kept on every ideation request and upload, so

- an upload from a browser that already sent a named request is attributed at once, and
- an upload that came first is claimed by the next named request from the same browser,

both within `LINK_WINDOW` and marked `metadata.user_source` so researchers can tell an inferred
owner (`client`) from a stated one (`auth`, `form`).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from pymongo.database import Database

LINK_WINDOW = timedelta(hours=12)  # one study session on one lab PC; older uploads are left alone


def client_key(remote_addr: str | None, user_agent: str | None) -> str:
    """A stable, non-reversible id of the browser a request came from."""
    raw = f"{remote_addr or ''}\0{user_agent or ''}".encode()
    return hashlib.sha256(b"ideation-client.v1\0" + raw).hexdigest()[:32]


def participant_of(db: Database, client: str, now: datetime | None = None) -> str | None:
    """The participant whose latest named ideation request came from this browser (within the window)."""
    since = (now or datetime.now(UTC)) - LINK_WINDOW
    latest: tuple[datetime, str] | None = None
    for coll, when in (("ideation_requests", "created_at"), ("ideation_time_records", "received_at")):
        doc = db[coll].find_one(
            {"client_key": client, "username": {"$nin": ["", None]}, when: {"$gte": since}},
            sort=[(when, -1)],
            projection={"username": 1, when: 1},
        )
        if doc is not None and (latest is None or doc[when] > latest[0]):
            latest = (doc[when], doc["username"])
    return latest[1] if latest else None


def claim_uploads(db: Database, app: str, client: str, username: str, now: datetime | None = None) -> int:
    """Give this browser's recent ownerless uploads to the participant who just named themselves."""
    if not username:
        return 0
    since = (now or datetime.now(UTC)) - LINK_WINDOW
    result = db["images.files"].update_many(
        {
            "metadata.app": app,
            "metadata.user": None,
            "metadata.client_key": client,
            "uploadDate": {"$gte": since},
        },
        {"$set": {"metadata.user": username, "metadata.user_source": "client"}},
    )
    return result.modified_count
